//! Bindings of `ferrox_core::optim::hessian`: one call per parameter group
//! over lists of tensors (params, grads, f32 state, optional Hessian inputs);
//! counts are added into a 2-element int64 `counts` tensor on the params'
//! device (clipped, positive), so nothing waits on the GPU.

use ferrox_core::optim::hessian::{self as hcore, AdaHessian, AdaHessianTensor, Refresh, Sophia, SophiaTensor};
use ferrox_core::{DType, Error, Result};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::{Device, Tensor};
use crate::with_float;

type List<'py> = Vec<Bound<'py, PyAny>>;

/// The group's tensors, checked: same float dtype and device for params,
/// grads and Hessian inputs; f32 state of the same shapes; the written
/// tensors overlap nothing.
struct Group<'py> {
    dtype: DType,
    device: Device,
    params: Vec<Tensor<'py>>,
    grads: Vec<Tensor<'py>>,
    m: Vec<Tensor<'py>>,
    state: Vec<Tensor<'py>>,
    x: Option<Vec<Tensor<'py>>>,
    y: Option<Vec<Tensor<'py>>>,
    counts: Tensor<'py>,
}

fn tensors<'py>(name: &'static str, list: &List<'py>, output: bool) -> PyResult<Vec<Tensor<'py>>> {
    list.iter().map(|t| if output { Tensor::output(name, t) } else { Tensor::input(name, t) }).collect()
}

impl<'py> Group<'py> {
    #[allow(clippy::too_many_arguments)]
    fn read(
        params: &List<'py>, grads: &List<'py>, m: &List<'py>, state: &List<'py>, state_name: &'static str,
        x: Option<&List<'py>>, y: Option<&List<'py>>, counts: &Bound<'py, PyAny>,
    ) -> PyResult<Self> {
        let g = Group {
            dtype: DType::F32,
            device: Device::Cpu,
            params: tensors("params", params, true)?,
            grads: tensors("grads", grads, false)?,
            m: tensors("exp_avg", m, true)?,
            state: tensors(state_name, state, true)?,
            x: x.map(|x| tensors("hessian", x, false)).transpose()?,
            y: y.map(|y| tensors(if state_name == "hessian_moment" { "probe_y" } else { "probes" }, y, false)).transpose()?,
            counts: Tensor::output("counts", counts)?,
        };
        g.check().map_err(to_py)
    }

    fn check(mut self) -> Result<Self> {
        let n = self.params.len();
        let first = self.params.first();
        self.dtype = first.map_or(DType::F32, |p| p.dtype);
        self.device = first.map_or(Device::Cpu, |p| p.device);
        let lists: [(&str, usize); 5] = [
            ("grads", self.grads.len()), ("exp_avg", self.m.len()), ("state", self.state.len()),
            ("hessian", self.x.as_ref().map_or(n, |v| v.len())), ("probe_y", self.y.as_ref().map_or(n, |v| v.len())),
        ];
        for (what, len) in lists {
            if len != n {
                return Err(Error::Shape(format!("{what}: expected {n} tensors (one per param), got {len}")));
            }
        }
        if self.counts.dtype != DType::I64 || self.counts.numel() != 2 || self.counts.device != self.device {
            return Err(Error::Value(format!(
                "counts: expected a 2-element int64 tensor on {}, got {} {:?} on {}",
                self.device, self.counts.dtype, self.counts.shape, self.counts.device
            )));
        }
        for i in 0..n {
            let p = &self.params[i];
            if !matches!(p.dtype, DType::F32 | DType::F16 | DType::BF16) || p.dtype != self.dtype || p.device != self.device {
                return Err(Error::DType(format!(
                    "params[{i}]: expected {} on {} like params[0], got {} on {}",
                    self.dtype, self.device, p.dtype, p.device
                )));
            }
            let same = |what: &str, t: &Tensor<'_>, dtype: DType| -> Result<()> {
                if t.dtype != dtype || t.device != p.device || t.numel() != p.numel() {
                    return Err(Error::Value(format!(
                        "{what}[{i}]: expected {dtype} with {} elements on {} (as params[{i}]), got {} with {} on {}",
                        p.numel(), p.device, t.dtype, t.numel(), t.device
                    )));
                }
                Ok(())
            };
            same("grads", &self.grads[i], self.dtype)?;
            same("exp_avg", &self.m[i], DType::F32)?;
            same("state", &self.state[i], DType::F32)?;
            if let Some(x) = &self.x {
                same("hessian", &x[i], self.dtype)?;
            }
            if let Some(y) = &self.y {
                same("probe_y", &y[i], self.dtype)?;
            }
        }
        self.check_overlaps()?;
        Ok(self)
    }

    /// Written tensors (params, state) must not overlap any other tensor;
    /// inputs may share memory (x = y for g ⊙ g).
    fn check_overlaps(&self) -> Result<()> {
        let mut spans: Vec<(u64, u64, bool, String)> = Vec::new();
        let mut add = |list: &[Tensor<'_>], what: &str, written: bool| {
            for (i, t) in list.iter().enumerate() {
                if t.numel() > 0 {
                    spans.push((t.ptr, t.ptr + t.nbytes(), written, format!("{what}[{i}]")));
                }
            }
        };
        add(&self.params, "params", true);
        add(&self.m, "exp_avg", true);
        add(&self.state, "state", true);
        add(&self.grads, "grads", false);
        if let Some(x) = &self.x {
            add(x, "hessian", false);
        }
        if let Some(y) = &self.y {
            add(y, "probe_y", false);
        }
        add(std::slice::from_ref(&self.counts), "counts", true);
        spans.sort_by_key(|s| s.0);
        for i in 0..spans.len() {
            for j in i + 1..spans.len() {
                if spans[j].0 >= spans[i].1 {
                    break;
                }
                if spans[i].2 || spans[j].2 {
                    return Err(Error::Value(format!("{}: memory overlaps {}; pass separate tensors", spans[i].3, spans[j].3)));
                }
            }
        }
        Ok(())
    }

    fn device_tensors(&self) -> Vec<ferrox_core::optim::hessian_cuda::DeviceTensor> {
        (0..self.params.len())
            .map(|i| ferrox_core::optim::hessian_cuda::DeviceTensor {
                n: self.params[i].numel(),
                param: self.params[i].ptr,
                grad: self.grads[i].ptr,
                m: self.m[i].ptr,
                state: self.state[i].ptr,
                x: self.x.as_ref().map_or(0, |v| v[i].ptr),
                y: self.y.as_ref().map_or(0, |v| v[i].ptr),
            })
            .collect()
    }

    /// # Safety
    /// CPU tensors checked by `read`; the slices live for the call.
    unsafe fn add_counts(&self, c: hcore::Counts) {
        let counts = self.counts.slice_mut::<i64>();
        counts[0] += c.clipped as i64;
        counts[1] += c.positive as i64;
    }
}

/// One fused Sophia step over a group (see `ferrox_core::optim::hessian`):
/// h is refreshed from `probe_x`·`probe_y`·`scale` with `beta2` when the
/// probes are given.
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, hessians, counts, *, lr, beta1, rho, eps, decay, probe_x=None, probe_y=None, beta2=0.0, scale=1.0, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn sophia_update(
    py: Python<'_>, params: List<'_>, grads: List<'_>, exp_avgs: List<'_>, hessians: List<'_>, counts: &Bound<'_, PyAny>,
    lr: f32, beta1: f64, rho: f32, eps: f32, decay: f32, probe_x: Option<List<'_>>, probe_y: Option<List<'_>>, beta2: f64,
    scale: f32, stream: u64,
) -> PyResult<()> {
    if probe_x.is_some() != probe_y.is_some() {
        return Err(to_py(Error::Value("probe_x, probe_y: give both or neither".into())));
    }
    let g = Group::read(&params, &grads, &exp_avgs, &hessians, "hessian_moment", probe_x.as_ref(), probe_y.as_ref(), counts)?;
    // 1 − β from the f64 β, rounded once (1 − f32(β) is 1.3e-5 off for β = 0.999).
    let s = Sophia { lr, beta1: beta1 as f32, one_minus_beta1: (1.0 - beta1) as f32, rho, eps, decay };
    let refresh = g.x.is_some().then_some(Refresh { beta2: beta2 as f32, one_minus_beta2: (1.0 - beta2) as f32, scale });
    match g.device {
        Device::Cuda(ordinal) => {
            let ts = g.device_tensors();
            let (dtype, c) = (g.dtype, g.counts.ptr);
            compute(py, move || unsafe { ferrox_core::optim::hessian_cuda::sophia_update(ordinal, stream, dtype, &ts, &s, refresh.as_ref(), c) })
        }
        Device::Cpu => with_float!(g.dtype, "params", T => {
            // SAFETY: dtypes, devices, lengths and overlaps checked in `read`.
            let mut ts: Vec<SophiaTensor<T>> = (0..g.params.len())
                .map(|i| unsafe {
                    SophiaTensor {
                        param: g.params[i].slice_mut::<T>(),
                        grad: g.grads[i].slice::<T>(),
                        m: g.m[i].slice_mut::<f32>(),
                        h: g.state[i].slice_mut::<f32>(),
                        probe: g.x.as_ref().zip(g.y.as_ref()).map(|(x, y)| (x[i].slice::<T>(), y[i].slice::<T>())),
                    }
                })
                .collect();
            let c = compute(py, move || hcore::sophia_update(&mut ts, &s, refresh.as_ref()))?;
            unsafe { g.add_counts(c) };
            Ok(())
        }),
    }
}

/// One fused AdaHessian step over a group; `hessians` (D, the spatially
/// averaged z ⊙ Hz) is given on refresh steps.
/// With `probes` (z), D is `hessians ⊙ probes` (Hz and z: the product fused).
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_hessian_diag_sqs, counts, *, step_size, beta1, beta2, bias_correction2, eps, power, decay, hessians=None, probes=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn adahessian_update(
    py: Python<'_>, params: List<'_>, grads: List<'_>, exp_avgs: List<'_>, exp_hessian_diag_sqs: List<'_>,
    counts: &Bound<'_, PyAny>, step_size: f32, beta1: f64, beta2: f64, bias_correction2: f32, eps: f32, power: f32,
    decay: f32, hessians: Option<List<'_>>, probes: Option<List<'_>>, stream: u64,
) -> PyResult<()> {
    if probes.is_some() && hessians.is_none() {
        return Err(to_py(Error::Value("probes: given without hessians".into())));
    }
    let g = Group::read(&params, &grads, &exp_avgs, &exp_hessian_diag_sqs, "exp_hessian_diag_sq", hessians.as_ref(), probes.as_ref(), counts)?;
    let a = AdaHessian {
        step_size, beta1: beta1 as f32, beta2: beta2 as f32, one_minus_beta1: (1.0 - beta1) as f32,
        one_minus_beta2: (1.0 - beta2) as f32, bias_correction2, eps, power, decay,
    };
    let refresh = g.x.is_some();
    match g.device {
        Device::Cuda(ordinal) => {
            let ts = g.device_tensors();
            let (dtype, c) = (g.dtype, g.counts.ptr);
            compute(py, move || unsafe { ferrox_core::optim::hessian_cuda::adahessian_update(ordinal, stream, dtype, &ts, &a, refresh, c) })
        }
        Device::Cpu => with_float!(g.dtype, "params", T => {
            // SAFETY: as in sophia_update.
            let mut ts: Vec<AdaHessianTensor<T>> = (0..g.params.len())
                .map(|i| unsafe {
                    AdaHessianTensor {
                        param: g.params[i].slice_mut::<T>(),
                        grad: g.grads[i].slice::<T>(),
                        m: g.m[i].slice_mut::<f32>(),
                        v: g.state[i].slice_mut::<f32>(),
                        d: g.x.as_ref().map(|x| x[i].slice::<T>()),
                        probe: g.y.as_ref().map(|y| y[i].slice::<T>()),
                    }
                })
                .collect();
            let c = compute(py, move || hcore::adahessian_update(&mut ts, &a))?;
            unsafe { g.add_counts(c) };
            Ok(())
        }),
    }
}

/// Rademacher probes (±1, see `ferrox_core::optim::hessian::rademacher_fill`)
/// written into CPU float tensors `outs` of one dtype, tensor k from element
/// `offsets[k]` of Philox stream (`seed`, `stream`); one parallel call.
#[pyfunction]
pub fn optim_rademacher(py: Python<'_>, outs: List<'_>, seed: u64, stream: u64, offsets: Vec<u64>) -> PyResult<()> {
    let ts = tensors("outs", &outs, true)?;
    if offsets.len() != ts.len() {
        return Err(to_py(Error::Shape(format!("offsets: expected {} (one per tensor), got {}", ts.len(), offsets.len()))));
    }
    let dtype = ts.first().map_or(DType::F32, |t| t.dtype);
    for (i, t) in ts.iter().enumerate() {
        t.expect_cpu().map_err(to_py)?;
        if t.dtype != dtype {
            return Err(to_py(Error::DType(format!("outs[{i}]: expected {dtype} like outs[0], got {}", t.dtype))));
        }
    }
    for i in 0..ts.len() {
        for j in i + 1..ts.len() {
            let (a, b) = (&ts[i], &ts[j]);
            if a.numel() > 0 && b.numel() > 0 && a.ptr < b.ptr + b.nbytes() && b.ptr < a.ptr + a.nbytes() {
                return Err(to_py(Error::Value(format!("outs[{i}]: memory overlaps outs[{j}]; pass separate tensors"))));
            }
        }
    }
    with_float!(dtype, "outs", T => {
        // SAFETY: CPU, dtype and disjointness checked above; the tensors live for the call.
        let mut outs: Vec<(u64, &mut [T])> = ts.iter().zip(&offsets).map(|(t, &o)| (o, unsafe { t.slice_mut::<T>() })).collect();
        compute(py, move || {
            hcore::rademacher_fill(seed, stream, &mut outs);
            Ok(())
        })
    })
}

/// True when no element of the CPU float tensors is NaN or ±inf (one
/// parallel scan, no allocation; dtypes may differ).
#[pyfunction]
pub fn optim_all_finite(py: Python<'_>, tensors_: List<'_>) -> PyResult<bool> {
    let ts = tensors("tensors", &tensors_, false)?;
    let (mut f32s, mut f16s, mut bf16s) = (Vec::new(), Vec::new(), Vec::new());
    for (i, t) in ts.iter().enumerate() {
        t.expect_cpu().map_err(to_py)?;
        // SAFETY: CPU tensors of the matched dtype, alive for the call.
        match t.dtype {
            DType::F32 => f32s.push(unsafe { t.slice::<f32>() }),
            DType::F16 => f16s.push(unsafe { t.slice::<half::f16>() }),
            DType::BF16 => bf16s.push(unsafe { t.slice::<half::bf16>() }),
            other => return Err(to_py(Error::DType(format!("tensors[{i}]: expected float32, float16 or bfloat16, got {other}")))),
        }
    }
    compute(py, move || Ok(hcore::all_finite(&f32s) && hcore::all_finite(&f16s) && hcore::all_finite(&bf16s)))
}
