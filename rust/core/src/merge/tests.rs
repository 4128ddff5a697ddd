//! Merges against a naive reference (stable sort for ranks, one element at a
//! time), and the streaming guarantees: the same bits for every chunk length,
//! from files as from memory.

use half::bf16;

use crate::philox;
use crate::test_rng::XorShift;

use super::*;

/// Roughly normal; with `ties`, a handful of levels (many exact ties).
fn value(g: &mut XorShift, ties: bool) -> f32 {
    if ties {
        [0.0, -0.0, 0.25, -0.25, 0.5, -1.0, 1.0, 0.125][g.below(8) as usize]
    } else {
        g.sum_of_4()
    }
}

fn data<T: Float>(n: usize, models: usize, seed: u64, ties: bool) -> (Vec<T>, Vec<Vec<T>>) {
    let mut g = XorShift::new(seed);
    let base: Vec<T> = (0..n).map(|_| T::from_f32(value(&mut g, false))).collect();
    let xs = (0..models)
        .map(|_| base.iter().map(|b| T::from_f32(b.to_f32() + 0.1 * value(&mut g, ties))).collect())
        .collect();
    (base, xs)
}

/// Keep mask of one delta over one unit by stable sort (|τ| descending,
/// lower index first).
fn reference_mask<T: Float>(s: &Sparsify, delta: &[T], start: usize) -> Vec<bool> {
    let n = delta.len();
    if let Sparsify::Random { density, seed, stream } = *s {
        return (0..n)
            .map(|j| {
                let i = (start + j) as u64;
                density >= 1.0 || philox::u32_to_uniform(philox::philox_block(seed, stream, i / 4)[(i % 4) as usize]) < density as f32
            })
            .collect();
    }
    let Some((lo, hi)) = s.rank_band(n) else { return vec![true; n] };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| delta[b].to_f32().abs().partial_cmp(&delta[a].to_f32().abs()).unwrap());
    let mut keep = vec![false; n];
    for &i in &order[lo..hi] {
        keep[i] = true;
    }
    keep
}

fn reference<T: Float>(base: &[T], xs: &[Vec<T>], models: &[Model], p: &Params) -> Vec<T> {
    let n = base.len();
    let unit = match p.granularity {
        Granularity::Tensor => n,
        Granularity::Row(r) => r,
    };
    let mut out = vec![T::from_f32(0.0); n];
    for u in (0..n).step_by(unit.max(1)) {
        let span = u..u + unit;
        let mut v = vec![vec![0.0f32; unit]; models.len()];
        for (m, (x, model)) in xs.iter().zip(models).enumerate() {
            let delta: Vec<T> = span.clone().map(|i| T::from_f32(x[i].to_f32() - base[i].to_f32())).collect();
            let keep = reference_mask(&model.sparsify, &delta, u);
            let mut scale = model.weight;
            if p.rescale && model.sparsify != Sparsify::Keep {
                let all: f64 = delta.iter().map(|d| d.to_f32().abs() as f64).sum();
                let kept: f64 = delta.iter().zip(&keep).filter(|(_, &k)| k).map(|(d, _)| d.to_f32().abs() as f64).sum();
                scale *= rescale_factor((all, kept));
            }
            for j in 0..unit {
                v[m][j] = if keep[j] { scale * delta[j].to_f32() } else { 0.0 };
            }
        }
        for j in 0..unit {
            let vs: Vec<f32> = v.iter().map(|vm| vm[j]).collect();
            let total = vs.iter().fold(0.0f32, |a, &b| a + b);
            let (mut mixed, mut divisor) = (total, models.iter().fold(0.0f32, |a, m| a + m.weight));
            if divisor.abs() < 1e-8 {
                divisor = 1.0;
            }
            if p.consensus {
                let agree = |x: f32| if total >= 0.0 { x > 0.0 } else { x < 0.0 };
                mixed = vs.iter().filter(|&&x| agree(x)).fold(0.0f32, |a, &b| a + b);
                divisor = vs.iter().zip(models).filter(|(&x, _)| agree(x)).fold(0.0f32, |a, (_, m)| a + m.weight);
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            }
            if p.normalize {
                mixed /= divisor;
            }
            out[u + j] = T::from_f32(base[u + j].to_f32() + mixed * p.lambda);
        }
    }
    out
}

fn params(consensus: bool, rescale: bool, granularity: Granularity) -> Params {
    Params { consensus, normalize: consensus, rescale, lambda: 0.9, granularity, check_finite: true }
}

/// (sparsifier, consensus, rescale) of every registry method.
fn methods() -> Vec<(Sparsify, bool, bool)> {
    vec![
        (Sparsify::Keep, false, false),
        (Sparsify::Magnitude { density: 0.3 }, true, false),
        (Sparsify::Band { density: 0.4, gamma: 0.05 }, false, false),
        (Sparsify::Band { density: 0.4, gamma: 0.05 }, true, false),
        (Sparsify::Random { density: 0.6, seed: 3, stream: 0 }, false, true),
        (Sparsify::Random { density: 0.6, seed: 3, stream: 0 }, true, true),
        (Sparsify::Magnitude { density: 0.2 }, false, true),
    ]
}

fn models_for(s: Sparsify, count: usize) -> Vec<Model> {
    (0..count)
        .map(|m| {
            let sparsify = match s {
                Sparsify::Random { density, seed, .. } => Sparsify::Random { density, seed, stream: m as u64 * 77 },
                other => other,
            };
            Model { weight: 0.3 + 0.2 * m as f32, sparsify }
        })
        .collect()
}

fn run<T: Float>(base: &[T], xs: &[Vec<T>], models: &[Model], p: &Params, chunk_len: usize) -> Vec<T> {
    let terms: Vec<Term<'_, T>> =
        xs.iter().zip(models).map(|(x, m)| Term { values: x, weight: m.weight, sparsify: m.sparsify }).collect();
    let mut out = vec![T::from_f32(0.0); base.len()];
    merge_tensor_chunked(base, &terms, p, &mut out, chunk_len).unwrap();
    out
}

fn bits<T: Float>(xs: &[T]) -> Vec<u32> {
    xs.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// The gap between |v| (rounded to T) and the next larger T: 1 ulp of T there.
fn ulp_of<T: Float>(v: f32) -> f32 {
    let k = T::key_of_f32(v.abs());
    T::from_abs_key(k + 1).to_f32() - T::from_abs_key(k).to_f32()
}

fn check_reference<T: Float>(n: usize, row: usize, seed: u64, ties: bool) {
    let (base, xs) = data::<T>(n, 3, seed, ties);
    for (s, consensus, rescale) in methods() {
        for g in [Granularity::Tensor, Granularity::Row(row)] {
            let models = models_for(s, 3);
            let p = params(consensus, rescale, g);
            let got = run(&base, &xs, &models, &p, DEFAULT_CHUNK);
            let want = reference(&base, &xs, &models, &p);
            if rescale {
                // The reference adds the rescale sums in another order, so its
                // factors may differ in the last f32 bit; the output then
                // differs by at most 1 ulp of T at the larger of |out| and
                // |base| (the rounding of base + λ·mixed can flip; an f32
                // output can also carry mixed's error, which is below that
                // ulp unless base + λ·mixed cancels, hence the |base| term).
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    let (a, b) = (a.to_f32(), b.to_f32());
                    let at = a.abs().max(b.abs()).max(base[i].to_f32().abs());
                    assert!((a - b).abs() <= ulp_of::<T>(at), "{s:?} {g:?} [{i}]: {a} vs {b} (1 ulp = {})", ulp_of::<T>(at));
                }
            } else {
                assert_eq!(bits(&got), bits(&want), "{s:?} consensus={consensus} {g:?} ties={ties}");
            }
        }
    }
}

#[test]
fn every_method_matches_the_naive_reference() {
    for (seed, ties) in [(1, false), (2, true), (3, true)] {
        check_reference::<f32>(3000, 60, seed, ties);
        check_reference::<bf16>(3000, 60, seed, ties);
        check_reference::<half::f16>(1000, 40, seed, ties);
    }
}

#[test]
fn multi_unit_tensors_match_the_reference() {
    // Several units, so per-unit tie ordinals and cross-unit cuts are exercised.
    check_reference::<bf16>(160 * 1234, 1234, 9, true);
    check_reference::<f32>(1703 * 77, 77, 10, true);
}

#[test]
fn results_do_not_depend_on_chunk_length() {
    let n = 77 * 4321; // just over 5 units
    for ties in [false, true] {
        let (base, xs) = data::<bf16>(n, 3, 4, ties);
        for (s, consensus, rescale) in methods() {
            for g in [Granularity::Tensor, Granularity::Row(4321)] {
                let models = models_for(s, 3);
                let p = params(consensus, rescale, g);
                let whole = bits(&run(&base, &xs, &models, &p, n));
                for chunk in [1, UNIT, 2 * UNIT + 5, 3 * 4321] {
                    assert_eq!(bits(&run(&base, &xs, &models, &p, chunk)), whole, "{s:?} {g:?} chunk {chunk}");
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let n = 3 * UNIT + 99;
    let (base, xs) = data::<bf16>(n, 3, 5, true);
    for (s, consensus, rescale) in methods() {
        let models = models_for(s, 3);
        let p = params(consensus, rescale, Granularity::Tensor);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let a = one.install(|| bits(&run(&base, &xs, &models, &p, UNIT)));
        let b = three.install(|| bits(&run(&base, &xs, &models, &p, 2 * UNIT)));
        assert_eq!(a, b, "{s:?}");
    }
}

fn write_raw(path: &std::path::Path, prefix: usize, bytes: &[u8]) {
    let mut all = vec![0xABu8; prefix];
    all.extend_from_slice(bytes);
    std::fs::write(path, all).unwrap();
}

fn le_bytes<T: Float>(xs: &[T]) -> Vec<u8> {
    xs.iter()
        .flat_map(|v| match T::DTYPE {
            DType::F32 => v.to_f32().to_le_bytes().to_vec(),
            DType::F16 => half::f16::from_f32(v.to_f32()).to_le_bytes().to_vec(),
            _ => bf16::from_f32(v.to_f32()).to_le_bytes().to_vec(),
        })
        .collect()
}

use crate::DType;

#[test]
fn file_streaming_equals_the_in_memory_merge() {
    let dir = std::env::temp_dir().join(format!("ferrox-merge-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let n = 2 * UNIT + 555;
    let (base, xs) = data::<bf16>(n, 2, 6, true);
    let spec = |name: &str, prefix: usize, bytes: Vec<u8>, dtype: DType| {
        let path = dir.join(name);
        write_raw(&path, prefix, &bytes);
        FileTensor { path, offset: prefix as u64, dtype }
    };
    let base_file = spec("base", 8, le_bytes(&base), DType::BF16);
    let model_files: Vec<FileTensor> =
        xs.iter().enumerate().map(|(m, x)| spec(&format!("m{m}"), 24 + m, le_bytes(x), DType::BF16)).collect();
    for (s, consensus, rescale) in methods() {
        let models = models_for(s, 2);
        let p = params(consensus, rescale, Granularity::Tensor);
        // bf16 files merged in bf16, written as bf16.
        let out = spec("out", 16, vec![0; 2 * n], DType::BF16);
        let mut src = FileInputs::<bf16>::open(Some(base_file.clone()), model_files.clone(), n).unwrap();
        let mut dst = FileOutput::<bf16>::open(out.clone(), n).unwrap();
        merge_stream(&mut src, &models, &p, &mut dst, UNIT).unwrap();
        let written = std::fs::read(&out.path).unwrap();
        assert_eq!(&written[..16], &[0xAB; 16], "bytes before the tensor are untouched");
        assert_eq!(written[16..], le_bytes(&run(&base, &xs, &models, &p, DEFAULT_CHUNK))[..], "{s:?}");
        // bf16 files merged in f32 (mergekit's `dtype: float32`), written as f32.
        let base32: Vec<f32> = base.iter().map(|v| v.to_f32()).collect();
        let xs32: Vec<Vec<f32>> = xs.iter().map(|x| x.iter().map(|v| v.to_f32()).collect()).collect();
        let out = spec("out32", 0, vec![0; 4 * n], DType::F32);
        let mut src = FileInputs::<f32>::open(Some(base_file.clone()), model_files.clone(), n).unwrap();
        let mut dst = FileOutput::<f32>::open(out.clone(), n).unwrap();
        merge_stream(&mut src, &models, &p, &mut dst, 3 * UNIT).unwrap();
        assert_eq!(std::fs::read(&out.path).unwrap(), le_bytes(&run(&base32, &xs32, &models, &p, DEFAULT_CHUNK)), "{s:?} f32");
    }
    // A truncated input is refused before anything is read.
    let short = spec("short", 0, vec![0; 10], DType::BF16);
    let err = FileInputs::<bf16>::open(Some(base_file), vec![short], n).err().unwrap().to_string();
    assert!(err.contains("short") && err.contains("truncated"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn non_finite_inputs_are_named() {
    let n = 2 * UNIT;
    let (base, mut xs) = data::<bf16>(n, 2, 7, false);
    xs[1][UNIT + 13] = bf16::from_f32(f32::INFINITY);
    xs[0][UNIT + 20] = bf16::NAN;
    for s in [Sparsify::Keep, Sparsify::Magnitude { density: 0.5 }] {
        for g in [Granularity::Tensor, Granularity::Row(UNIT)] {
            let models = models_for(s, 2);
            let terms: Vec<Term<'_, bf16>> =
                xs.iter().zip(&models).map(|(x, m)| Term { values: x, weight: m.weight, sparsify: m.sparsify }).collect();
            let mut out = vec![bf16::from_f32(0.0); n];
            let p = params(false, false, g);
            let err = merge_tensor(&base, &terms, &p, &mut out).unwrap_err().to_string();
            assert!(err.contains(&format!("models[1]: non-finite value inf at flat index {}", UNIT + 13)), "{s:?} {g:?}: {err}");
            let lenient = Params { check_finite: false, ..p };
            let r = merge_tensor(&base, &terms, &lenient, &mut out);
            if s == Sparsify::Keep {
                assert!(r.is_ok());
            } else {
                assert!(r.unwrap_err().to_string().contains("NaN"));
            }
        }
    }
}

#[test]
fn changed_counts_elements_that_differ_from_the_base() {
    let n = UNIT + 10;
    let (base, xs) = data::<f32>(n, 1, 8, false);
    let models = [Model { weight: 1.0, sparsify: Sparsify::Magnitude { density: 0.25 } }];
    let terms = [Term { values: &xs[0][..], weight: 1.0, sparsify: models[0].sparsify }];
    let mut out = vec![0.0f32; n];
    let stats = merge_tensor(&base, &terms, &params(false, false, Granularity::Tensor), &mut out).unwrap();
    let expected = out.iter().zip(&base).filter(|(a, b)| a != b).count() as u64;
    assert_eq!(stats.changed, expected);
    assert!((stats.changed as f64 - 0.25 * n as f64).abs() < 0.01 * n as f64);
}
