//! Multilinear-extension importance: the exact gradient by a dynamic
//! program, its (ε, δ) Monte-Carlo approximation, and projected gradient
//! ascent on the existence probabilities.
//!
//! # The model
//! Query q ranks items i = 1..m (corpus ids `ids[i]`, utilities `u_i`).
//! Each corpus item exists independently with probability `p[id]`; the model
//! keeps the first k existing items in rank order and scores
//! U = (1/k) Σ (their utilities). The importance objective is the mean over
//! queries of E[U], the multilinear extension of U in p.
//!
//! # The dynamic program (O(m·k) per query)
//! Item i counts iff it exists and fewer than k items ranked before it exist:
//!
//!   E[U] = (1/k) Σ_i u_i p_i A_i,   A_i = P(C_{<i} < k) = Σ_{c<k} IP_i[c],
//!
//! with `IP_i[c]` = P(exactly c of items 1..i-1 exist), built forward by
//! IP_{i+1}[c] = (1 − p_i) IP_i[c] + p_i IP_i[c − 1] (only c < k is kept).
//! E[U] is affine in each p_j. p_j appears in its own term and in A_i for
//! every i > j: conditioning on item j, A_i = p_j P(C' < k−1) + (1−p_j) P(C' < k)
//! with C' the count among 1..i-1 without j, so ∂A_i/∂p_j = −P(C' = k − 1).
//! C' splits into the items before j and those strictly between j and i:
//!
//!   k ∂E/∂p_j = u_j A_j − Σ_{a<k} IP_j[a] · S_j[k − 1 − a],
//!   S_j[b] = Σ_{i>j} u_i p_i P(exactly b of items j+1..i−1 exist),
//!
//! and S runs backward: S_{j−1}[b] = (1 − p_j) S_j[b] + p_j S_j[b − 1] + [b = 0] u_j p_j.
//! One forward pass stores the m rows of IP (m·k values of scratch), one
//! backward pass carries S (k values). When k ≥ m, A_i = 1 and no
//! correction term can reach k − 1, so k ∂E/∂p_j = u_j exactly.
//! Both recursions are convex combinations of probabilities, so they are
//! stable; everything is f64.
//!
//! # Determinism
//! Queries are processed in blocks; inside a block each query's m partial
//! derivatives are written (in parallel) to its own slice of a buffer. The
//! buffer is then added into the gradient by id ranges, one range per task:
//! every task scans the block in query order and adds only the ids it owns,
//! so each gradient entry receives its terms in (query, rank) order whatever
//! the thread count or block size. The result is the same bits on 1 or 64
//! threads. The final division by k·Q is elementwise.
//!
//! # Sampling (ε, δ)
//! For one existence pattern X, flipping item j changes U by
//! D_j = (u_j − u_d)/k if fewer than k existing items precede j (d = the item
//! that j pushes out of the top k, u_d = 0 if there is none) and 0 otherwise;
//! E[D_j] = ∂E/∂p_j (affine in p_j). D_j lies in [−w, w] with
//! w = (max(u ∪ {0}) − min(u ∪ {0}))/k over all utilities, so by Hoeffding's
//! inequality S = ⌈2 w² ln(2/δ) / ε²⌉ independent patterns per query give
//! P(|ĝ_j − g_j| ≥ ε) ≤ δ for every item j separately (the mean over queries
//! averages independent estimates, which only tightens the bound; a bound for
//! all items at once needs δ/N). Pattern s of query q draws item r's
//! uniform from Philox element s·m + r of stream (seed, q), so the estimate
//! depends on the seed only, never on threads.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::philox::philox_block;

/// Queries are processed in blocks of about this many retrieved entries: the
/// per-entry buffer stays small while each block still has work for every
/// thread.
const BLOCK_ENTRIES: usize = 1 << 18;

/// Validated ranked retrievals over a corpus of `num_items` items: query q's
/// items are `ids[start..start + len]` (rank order) with `rows[q] = (start, len)`.
pub struct Retrievals<'a> {
    ids: &'a [i64],
    utility: &'a [f64],
    rows: Vec<(usize, usize)>,
    num_items: usize,
}

impl<'a> Retrievals<'a> {
    /// `[num_queries, m]` row-major rows, a row ending early with −1 padding
    /// (every id after the first −1 must be −1; utilities there are ignored).
    pub fn padded(ids: &'a [i64], utility: &'a [f64], num_queries: usize, m: usize, num_items: usize) -> Result<Self> {
        let want = num_queries.checked_mul(m).ok_or_else(|| Error::Shape(format!("retrieved: shape [{num_queries}, {m}] is too large")))?;
        if ids.len() != want {
            return Err(Error::Shape(format!("retrieved: expected {want} ids for shape [{num_queries}, {m}], got {}", ids.len())));
        }
        if utility.len() != ids.len() {
            return Err(Error::Shape(format!(
                "utility: expected the shape of retrieved ([{num_queries}, {m}], {} values), got {} values",
                ids.len(),
                utility.len()
            )));
        }
        let rows: Vec<(usize, usize)> = (0..num_queries)
            .into_par_iter()
            .map(|q| {
                let row = &ids[q * m..(q + 1) * m];
                (q * m, row.iter().position(|&id| id == -1).unwrap_or(m))
            })
            .collect();
        // Ids after the first −1 of a row must all be −1.
        let bad = (0..num_queries).into_par_iter().find_map_first(|q| {
            let (start, len) = rows[q];
            (len..m).find(|&j| ids[start + j] != -1).map(|j| (q, j, ids[start + j]))
        });
        if let Some((q, j, id)) = bad {
            return Err(Error::Value(format!(
                "retrieved: query {q} has id {id} at position {j} after -1 padding (padding must end the row)"
            )));
        }
        let r = Retrievals { ids, utility, rows, num_items };
        r.check_rows()?;
        Ok(r)
    }

    /// CSR form: query q's items are `ids[indptr[q]..indptr[q + 1]]`.
    pub fn csr(ids: &'a [i64], utility: &'a [f64], indptr: &[i64], num_items: usize) -> Result<Self> {
        if utility.len() != ids.len() {
            return Err(Error::Shape(format!(
                "utility: expected as many values as retrieved ({}), got {}",
                ids.len(),
                utility.len()
            )));
        }
        if indptr.is_empty() {
            return Err(Error::Shape("indptr: expected num_queries + 1 offsets, got an empty array".into()));
        }
        if indptr[0] != 0 {
            return Err(Error::Value(format!("indptr: expected indptr[0] = 0, got {}", indptr[0])));
        }
        let last = indptr[indptr.len() - 1];
        if last != ids.len() as i64 {
            return Err(Error::Value(format!(
                "indptr: expected the last offset to be len(retrieved) = {}, got {last}",
                ids.len()
            )));
        }
        let mut rows = Vec::with_capacity(indptr.len() - 1);
        for (q, w) in indptr.windows(2).enumerate() {
            if w[1] < w[0] {
                return Err(Error::Value(format!(
                    "indptr: offsets must not decrease, got indptr[{q}] = {} > indptr[{}] = {}",
                    w[0],
                    q + 1,
                    w[1]
                )));
            }
            // 0 <= w[0] <= w[1] <= len(ids) here, so the casts are exact.
            rows.push((w[0] as usize, (w[1] - w[0]) as usize));
        }
        let r = Retrievals { ids, utility, rows, num_items };
        r.check_rows()?;
        Ok(r)
    }

    pub fn num_queries(&self) -> usize {
        self.rows.len()
    }

    pub fn num_items(&self) -> usize {
        self.num_items
    }

    fn row(&self, q: usize) -> (&[i64], &[f64]) {
        let (start, len) = self.rows[q];
        (&self.ids[start..start + len], &self.utility[start..start + len])
    }

    /// Ids in range, none twice within a query, finite utilities. The error
    /// of the first bad query (by index) is reported, whatever the threads.
    fn check_rows(&self) -> Result<()> {
        let n = self.num_items;
        let err = (0..self.num_queries())
            .into_par_iter()
            .map_init(Vec::new, |table: &mut Vec<(i64, usize)>, q| {
                let (ids, util) = self.row(q);
                for (j, (&id, &u)) in ids.iter().zip(util).enumerate() {
                    if id < 0 || id as u64 >= n as u64 {
                        return Some(Error::Value(format!(
                            "retrieved: id {id} at query {q}, position {j} is out of range [0, {n}) (probs has {n} items)"
                        )));
                    }
                    if !u.is_finite() {
                        return Some(Error::Value(format!("utility: non-finite value {u} at query {q}, position {j}")));
                    }
                }
                first_repeat(ids, table).map(|(id, a, b)| {
                    Error::Value(format!("retrieved: id {id} appears twice in query {q} (positions {a} and {b})"))
                })
            })
            .find_map_first(|e| e);
        err.map_or(Ok(()), Err)
    }

    /// max − min over all utilities and 0 (the width behind the sampling bound).
    fn utility_span(&self) -> f64 {
        let (lo, hi) = (0..self.num_queries())
            .into_par_iter()
            .map(|q| self.row(q).1.iter().fold((0.0f64, 0.0f64), |(lo, hi), &u| (lo.min(u), hi.max(u))))
            .reduce(|| (0.0, 0.0), |a, b| (a.0.min(b.0), a.1.max(b.1)));
        hi - lo
    }
}

/// The first id of `ids` (all >= 0) seen before, with both positions: an
/// open-addressing set of (id, position) at most half full, O(m) per query
/// (sorting each query was most of a gradient call's time).
fn first_repeat(ids: &[i64], table: &mut Vec<(i64, usize)>) -> Option<(i64, usize, usize)> {
    let bits = (2 * ids.len()).max(2).next_power_of_two().trailing_zeros();
    let mask = (1usize << bits) - 1;
    table.clear();
    table.resize(mask + 1, (-1, 0));
    for (j, &id) in ids.iter().enumerate() {
        // Fibonacci hashing: the top bits of id * 2^64/φ.
        let mut h = ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize & mask;
        loop {
            let (seen, at) = table[h];
            if seen == -1 {
                table[h] = (id, j);
                break;
            }
            if seen == id {
                return Some((id, at, j));
            }
            h = (h + 1) & mask;
        }
    }
    None
}

fn check_k(k: usize) -> Result<()> {
    if k == 0 {
        return Err(Error::Value("k: expected k >= 1, got 0".into()));
    }
    Ok(())
}

fn check_probs(name: &str, probs: &[f64], n: usize) -> Result<()> {
    if probs.len() != n {
        return Err(Error::Shape(format!("{name}: expected {n} values (one per corpus item), got {}", probs.len())));
    }
    let bad = probs.par_iter().enumerate().find_map_first(|(i, &p)| (!(0.0..=1.0).contains(&p)).then_some((i, p)));
    match bad {
        Some((i, p)) => Err(Error::Value(format!("{name}: value {p} at index {i} is outside [0, 1]"))),
        None => Ok(()),
    }
}

/// Per-thread scratch of the DP: the m rows of IP and the k values of S.
#[derive(Default)]
struct Scratch {
    ip: Vec<f64>,
    s: Vec<f64>,
    exists: Vec<bool>,
    firsts: Vec<usize>,
    p: Vec<f64>,
}

impl Scratch {
    /// The query's probabilities, gathered in one pass: the loads are
    /// independent, so the random reads of a large `probs` overlap instead
    /// of stalling the recursions one by one.
    fn gather(&mut self, ids: &[i64], probs: &[f64]) {
        self.p.clear();
        self.p.extend(ids.iter().map(|&i| probs[i as usize]));
    }
}

/// k·∂E_q/∂p for the items of one query, written to `out` (see the module
/// comment for the recursions).
fn query_gradient(ids: &[i64], util: &[f64], probs: &[f64], k: usize, sc: &mut Scratch, out: &mut [f64]) {
    let m = ids.len();
    if k >= m {
        out.copy_from_slice(util);
        return;
    }
    sc.gather(ids, probs);
    sc.ip.clear();
    sc.ip.resize(m * k, 0.0);
    sc.s.clear();
    sc.s.resize(k, 0.0);
    let (ip, s, p) = (&mut sc.ip, &mut sc.s, &sc.p);
    // Forward: row j holds P(exactly c of items 0..j-1 exist), c < k.
    ip[0] = 1.0;
    for j in 1..m {
        let pj = p[j - 1];
        let (prev, cur) = ip[(j - 1) * k..(j + 1) * k].split_at_mut(k);
        cur[0] = (1.0 - pj) * prev[0];
        for c in 1..k {
            cur[c] = (1.0 - pj) * prev[c] + pj * prev[c - 1];
        }
    }
    // Backward: s[b] = Σ_{i>j} u_i p_i P(exactly b of items j+1..i-1 exist).
    for j in (0..m).rev() {
        let row = &ip[j * k..(j + 1) * k];
        let a: f64 = row.iter().sum();
        let mut corr = 0.0;
        for (c, &r) in row.iter().enumerate() {
            corr += r * s[k - 1 - c];
        }
        out[j] = util[j] * a - corr;
        let pj = p[j];
        for b in (1..k).rev() {
            s[b] = (1.0 - pj) * s[b] + pj * s[b - 1];
        }
        s[0] = (1.0 - pj) * s[0] + util[j] * pj;
    }
}

/// Element `e` of Philox stream (seed, q) as a uniform in (0, 1).
struct Uniforms {
    seed: u64,
    stream: u64,
    block: u64,
    words: [u32; 4],
}

impl Uniforms {
    fn new(seed: u64, stream: u64) -> Self {
        Uniforms { seed, stream, block: 0, words: philox_block(seed, stream, 0) }
    }

    fn get(&mut self, e: u64) -> f64 {
        let b = e / 4;
        if b != self.block {
            self.block = b;
            self.words = philox_block(self.seed, self.stream, b);
        }
        // (x + 0.5) / 2^32: strictly inside (0, 1), so p = 1 always exists
        // and p = 0 never does.
        (self.words[(e % 4) as usize] as f64 + 0.5) * (1.0 / 4_294_967_296.0)
    }
}

/// Mean over `samples` patterns of k·D_j for one query (see the module comment).
#[allow(clippy::too_many_arguments)]
fn query_sampled(
    q: usize,
    ids: &[i64],
    util: &[f64],
    probs: &[f64],
    k: usize,
    samples: usize,
    seed: u64,
    sc: &mut Scratch,
    out: &mut [f64],
) {
    let m = ids.len();
    out.fill(0.0);
    if m == 0 {
        return;
    }
    let mut rng = Uniforms::new(seed, q as u64);
    sc.gather(ids, probs);
    let p = &sc.p;
    let exists = &mut sc.exists;
    exists.clear();
    exists.resize(m, false);
    // The first k + 1 existing ranks (all that D_j needs).
    let firsts = &mut sc.firsts;
    for s in 0..samples {
        firsts.clear();
        for j in 0..m {
            exists[j] = rng.get((s * m + j) as u64) < p[j];
            if exists[j] && firsts.len() <= k {
                firsts.push(j);
            }
        }
        let mut before = 0usize;
        for j in 0..m {
            if before < k {
                // Without j the k-th existing item is firsts[k-1]; j itself
                // sits at index `before` of firsts when it exists.
                let at = if exists[j] { k } else { k - 1 };
                let pushed = firsts.get(at).map_or(0.0, |&r| util[r]);
                out[j] += util[j] - pushed;
            }
            before += exists[j] as usize;
        }
    }
    let inv = samples as f64;
    out.iter_mut().for_each(|o| *o /= inv);
}

/// Block boundaries: consecutive queries with about `BLOCK_ENTRIES` entries.
fn blocks(r: &Retrievals<'_>, max_entries: usize) -> Vec<(usize, usize)> {
    let nq = r.num_queries();
    let mut out = Vec::new();
    let mut q0 = 0;
    while q0 < nq {
        let base = r.rows[q0].0;
        let mut q1 = q0 + 1;
        while q1 < nq && r.rows[q1].0 + r.rows[q1].1 - base <= max_entries {
            q1 += 1;
        }
        out.push((q0, q1));
        q0 = q1;
    }
    out
}

/// `per_query`'s values for the entries of queries [q0, q1), computed in
/// parallel into `buf`, laid out like `ids` from the block's first entry
/// (returned; padding positions hold 0).
fn block_values<F>(r: &Retrievals<'_>, (q0, q1): (usize, usize), buf: &mut Vec<f64>, per_query: &F) -> usize
where
    F: Fn(usize, &[i64], &[f64], &mut Scratch, &mut [f64]) + Sync,
{
    let base = r.rows[q0].0;
    let end = r.rows[q1 - 1].0 + r.rows[q1 - 1].1;
    buf.clear();
    buf.resize(end - base, 0.0);
    let mut jobs: Vec<(usize, &mut [f64])> = Vec::with_capacity(q1 - q0);
    let mut rest: &mut [f64] = buf;
    let mut at = base;
    for q in q0..q1 {
        let (start, len) = r.rows[q];
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - at);
        let (row, tail) = tail.split_at_mut(len);
        jobs.push((q, row));
        rest = tail;
        at = start + len;
    }
    jobs.into_par_iter().for_each_init(Scratch::default, |sc, (q, row)| {
        let (ids, util) = r.row(q);
        per_query(q, ids, util, sc, row);
    });
    base
}

/// For every entry of queries [q0, q1) in (query, rank) order:
/// `out[id] = apply(out[id], value)`. Parallel over id ranges (each task
/// scans the block and touches only its ids), so every entry of `out` sees
/// its terms in the same order for any thread count.
fn scatter<A>(r: &Retrievals<'_>, (_, q1): (usize, usize), base: usize, buf: &[f64], out: &mut [f64], apply: A)
where
    A: Fn(f64, f64) -> f64 + Sync,
{
    let range = out.len().div_ceil(rayon::current_num_threads().max(1)).max(1);
    let end = r.rows[q1 - 1].0 + r.rows[q1 - 1].1;
    // The block's entries are contiguous in `ids` (rows in order; padding is
    // -1, owned by no range), so one flat pass is (query, rank) order.
    let ids = &r.ids[base..end];
    out.par_chunks_mut(range).enumerate().for_each(|(c, o)| {
        let lo = (c * range) as i64;
        let hi = lo + o.len() as i64;
        for (e, (&id, &v)) in ids.iter().zip(buf).enumerate() {
            if let Some(&ahead) = ids.get(e + PREFETCH_AHEAD) {
                if ahead >= lo && ahead < hi {
                    prefetch(o.as_ptr().wrapping_add((ahead - lo) as usize));
                }
            }
            if id >= lo && id < hi {
                let x = &mut o[(id - lo) as usize];
                *x = apply(*x, v);
            }
        }
    });
}

/// How many entries ahead the scatter prefetches its random targets.
const PREFETCH_AHEAD: usize = 16;

/// A hint only (no fault on any address): the random reads of a large
/// `probs` or gradient are the cost of an epoch, so they are requested early
/// (about 20% less CPU time per epoch at 10^7 items).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults and changes no state visible to Rust.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetches the probabilities of query `q` (if any), to be read next.
fn prefetch_row(r: &Retrievals<'_>, q: usize, probs: &[f64]) {
    if q < r.num_queries() {
        for &id in r.row(q).0 {
            prefetch(probs.as_ptr().wrapping_add(id as usize));
        }
    }
}

/// Σ over queries of `per_query(q, ids, util, scratch, out_row)` into `out`,
/// in (query, rank) order per entry (see "Determinism"), then divided by k·Q.
fn accumulate<F>(r: &Retrievals<'_>, k: usize, out: &mut [f64], per_query: F)
where
    F: Fn(usize, &[i64], &[f64], &mut Scratch, &mut [f64]) + Sync,
{
    out.par_iter_mut().for_each(|o| *o = 0.0);
    let mut buf: Vec<f64> = Vec::new();
    for block in blocks(r, BLOCK_ENTRIES) {
        let base = block_values(r, block, &mut buf, &per_query);
        scatter(r, block, base, &buf, out, |x, v| x + v);
    }
    let denom = k as f64 * r.num_queries() as f64;
    if r.num_queries() > 0 {
        out.par_iter_mut().for_each(|o| *o /= denom);
    }
}

/// Exact ∂/∂p of the mean over queries of E[(1/k) Σ utility of the top-k
/// existing items], written to `out` (one value per corpus item; items never
/// retrieved get 0).
pub fn multilinear_gradient(r: &Retrievals<'_>, k: usize, probs: &[f64], out: &mut [f64]) -> Result<()> {
    check_k(k)?;
    check_probs("probs", probs, r.num_items)?;
    check_out(out, r.num_items)?;
    accumulate(r, k, out, |q, ids, util, sc, row| {
        prefetch_row(r, q + 1, probs);
        query_gradient(ids, util, probs, k, sc, row)
    });
    Ok(())
}

fn check_out(out: &[f64], n: usize) -> Result<()> {
    if out.len() != n {
        return Err(Error::Shape(format!("out: expected {n} values (one per corpus item), got {}", out.len())));
    }
    Ok(())
}

fn check_eps_delta(eps: f64, delta: f64) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::Value(format!("eps: expected a finite value > 0, got {eps}")));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(Error::Value(format!("delta: expected a value in (0, 1), got {delta}")));
    }
    Ok(())
}

/// Patterns per query for an (ε, δ) estimate: ⌈2 w² ln(2/δ) / ε²⌉ (at least 1)
/// with w = span / k, `span` = max − min over the utilities and 0.
pub fn sample_count(span: f64, k: usize, eps: f64, delta: f64) -> Result<usize> {
    check_k(k)?;
    check_eps_delta(eps, delta)?;
    let w = span / k as f64;
    let s = (2.0 * w * w * (2.0 / delta).ln() / (eps * eps)).ceil();
    if s > 1e12 {
        return Err(Error::Value(format!(
            "eps: {eps} with delta {delta} needs {s} samples per query; use a larger eps or delta"
        )));
    }
    Ok((s as usize).max(1))
}

/// The (ε, δ) Monte-Carlo estimate of `multilinear_gradient`: every entry is
/// within `eps` of the exact one with probability at least 1 − `delta`.
/// Returns the number of sampled patterns per query.
pub fn sampled_gradient(r: &Retrievals<'_>, k: usize, probs: &[f64], eps: f64, delta: f64, seed: u64, out: &mut [f64]) -> Result<usize> {
    check_k(k)?;
    check_eps_delta(eps, delta)?;
    check_probs("probs", probs, r.num_items)?;
    check_out(out, r.num_items)?;
    let samples = sample_count(r.utility_span(), k, eps, delta)?;
    accumulate(r, k, out, |q, ids, util, sc, row| query_sampled(q, ids, util, probs, k, samples, seed, sc, row));
    Ok(samples)
}

/// How grouped items share a weight in `learn_importance`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupStep {
    /// One weight per group, stepped by the sum of its items' gradients (the
    /// gradient of the objective in the shared weight), then clipped.
    Sum,
    /// ragbooster's rule: every item steps and is clipped on its own, then
    /// each item is set to its group's mean.
    Mean,
}

/// Projected gradient ascent `v ← clip(v + lr·g(v), 0, 1)` for `epochs`
/// epochs, starting from `v` (updated in place). With `groups`
/// (`groups[i]` = the group of item i, in [0, G)), items of one group share a
/// weight as `step` says.
pub fn learn_importance(
    r: &Retrievals<'_>,
    k: usize,
    learning_rate: f64,
    epochs: usize,
    groups: Option<(&[i64], GroupStep)>,
    v: &mut [f64],
) -> Result<()> {
    check_k(k)?;
    if !learning_rate.is_finite() {
        return Err(Error::Value(format!("learning_rate: expected a finite value, got {learning_rate}")));
    }
    let n = r.num_items;
    check_probs("probs", v, n)?;
    let nq = r.num_queries();
    let span = if nq == 0 { 0 } else { r.rows[nq - 1].0 + r.rows[nq - 1].1 - r.rows[0].0 };
    if groups.is_none() && span < n {
        // Fewer entries than items: keep one value per entry instead of a
        // dense gradient (the peak memory is then v plus the retrievals).
        // The step is added entry by entry in (query, rank) order, then the
        // touched items are clipped.
        let denom = k as f64 * nq as f64;
        let mut buf = Vec::new();
        for _ in 0..epochs {
            if nq == 0 {
                break;
            }
            let all = (0, nq);
            let base = block_values(r, all, &mut buf, &|q, ids, util, sc, row| {
                prefetch_row(r, q + 1, v);
                query_gradient(ids, util, v, k, sc, row)
            });
            scatter(r, all, base, &buf, v, |x, g| x + learning_rate * (g / denom));
            scatter(r, all, base, &buf, v, |x, _| x.clamp(0.0, 1.0));
        }
        return Ok(());
    }
    let mut grad = vec![0.0f64; n];
    let Some((groups, step)) = groups else {
        for _ in 0..epochs {
            multilinear_gradient(r, k, v, &mut grad)?;
            v.par_iter_mut().zip(&grad).for_each(|(x, g)| *x = (*x + learning_rate * g).clamp(0.0, 1.0));
        }
        return Ok(());
    };
    if groups.len() != n {
        return Err(Error::Shape(format!("grouping: expected {n} group ids (one per corpus item), got {}", groups.len())));
    }
    if let Some((i, &g)) = groups.iter().enumerate().find(|(_, &g)| g < 0) {
        return Err(Error::Value(format!("grouping: group id {g} at item {i} is negative")));
    }
    let num_groups = groups.iter().max().map_or(0, |&g| g as usize + 1);
    // Group means, summed in item order (deterministic).
    let means = |v: &[f64]| {
        let mut sum = vec![0.0f64; num_groups];
        let mut count = vec![0usize; num_groups];
        for (&g, &x) in groups.iter().zip(v) {
            sum[g as usize] += x;
            count[g as usize] += 1;
        }
        sum.iter().zip(&count).map(|(s, &c)| if c > 0 { s / c as f64 } else { 0.0 }).collect::<Vec<f64>>()
    };
    match step {
        GroupStep::Mean => {
            for _ in 0..epochs {
                multilinear_gradient(r, k, v, &mut grad)?;
                v.par_iter_mut().zip(&grad).for_each(|(x, g)| *x = (*x + learning_rate * g).clamp(0.0, 1.0));
                let w = means(v);
                v.par_iter_mut().zip(groups).for_each(|(x, &g)| *x = w[g as usize]);
            }
        }
        GroupStep::Sum => {
            let mut w = means(v);
            for _ in 0..epochs {
                v.par_iter_mut().zip(groups).for_each(|(x, &g)| *x = w[g as usize]);
                multilinear_gradient(r, k, v, &mut grad)?;
                let mut total = vec![0.0f64; num_groups];
                for (&g, &d) in groups.iter().zip(&grad) {
                    total[g as usize] += d;
                }
                w.iter_mut().zip(&total).for_each(|(x, t)| *x = (*x + learning_rate * t).clamp(0.0, 1.0));
            }
            v.par_iter_mut().zip(groups).for_each(|(x, &g)| *x = w[g as usize]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;

    fn unif(rng: &mut XorShift) -> f64 {
        rng.below(1 << 30) as f64 / (1u64 << 30) as f64
    }

    /// E[U] and its gradient for one query by enumerating all 2^m patterns.
    fn brute(util: &[f64], p: &[f64], k: usize) -> Vec<f64> {
        let m = util.len();
        let mut grad = vec![0.0; m];
        for mask in 0u32..(1 << m) {
            let mut taken = 0;
            let mut u = 0.0;
            for i in 0..m {
                if mask >> i & 1 == 1 && taken < k {
                    u += util[i];
                    taken += 1;
                }
            }
            u /= k as f64;
            for j in 0..m {
                let mut w = 1.0;
                for i in (0..m).filter(|&i| i != j) {
                    w *= if mask >> i & 1 == 1 { p[i] } else { 1.0 - p[i] };
                }
                grad[j] += if mask >> j & 1 == 1 { w * u } else { -w * u };
            }
        }
        grad
    }

    fn random_case(rng: &mut XorShift, q: usize, m: usize, n: usize) -> (Vec<i64>, Vec<f64>, Vec<f64>) {
        let mut ids = Vec::new();
        for _ in 0..q {
            let mut pool: Vec<i64> = (0..n as i64).collect();
            for j in 0..m {
                let t = j + rng.below((n - j) as u64) as usize;
                pool.swap(j, t);
                ids.push(pool[j]);
            }
        }
        let util = (0..q * m).map(|_| unif(rng) * 4.0 - 1.0).collect();
        let probs = (0..n).map(|_| unif(rng)).collect();
        (ids, util, probs)
    }

    fn brute_all(ids: &[i64], util: &[f64], rows: &[(usize, usize)], probs: &[f64], k: usize) -> Vec<f64> {
        let mut g = vec![0.0; probs.len()];
        for &(s, l) in rows {
            let p: Vec<f64> = ids[s..s + l].iter().map(|&i| probs[i as usize]).collect();
            for (j, d) in brute(&util[s..s + l], &p, k).into_iter().enumerate() {
                g[ids[s + j] as usize] += d;
            }
        }
        g.iter_mut().for_each(|x| *x /= rows.len() as f64);
        g
    }

    #[test]
    fn dp_matches_enumeration() {
        let mut rng = XorShift::new(7);
        for m in [1usize, 2, 5, 9, 12] {
            for k in [1usize, 2, 3, m + 2] {
                let (q, n) = (3, m + 4);
                let (ids, util, probs) = random_case(&mut rng, q, m, n);
                let r = Retrievals::padded(&ids, &util, q, m, n).unwrap();
                let mut g = vec![0.0; n];
                multilinear_gradient(&r, k, &probs, &mut g).unwrap();
                let want = brute_all(&ids, &util, &r.rows, &probs, k);
                for (a, b) in g.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-12, "m={m} k={k}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn ragged_forms_agree() {
        let mut rng = XorShift::new(11);
        let (q, m, n) = (4, 6, 15);
        let (mut ids, util, probs) = random_case(&mut rng, q, m, n);
        let lens = [6usize, 0, 3, 5];
        for (qi, &l) in lens.iter().enumerate() {
            ids[qi * m + l..(qi + 1) * m].iter_mut().for_each(|x| *x = -1);
        }
        let mut csr_ids = Vec::new();
        let mut csr_u = Vec::new();
        let mut indptr = vec![0i64];
        for (qi, &l) in lens.iter().enumerate() {
            csr_ids.extend_from_slice(&ids[qi * m..qi * m + l]);
            csr_u.extend_from_slice(&util[qi * m..qi * m + l]);
            indptr.push(csr_ids.len() as i64);
        }
        let a = Retrievals::padded(&ids, &util, q, m, n).unwrap();
        let b = Retrievals::csr(&csr_ids, &csr_u, &indptr, n).unwrap();
        let (mut ga, mut gb) = (vec![0.0; n], vec![0.0; n]);
        multilinear_gradient(&a, 2, &probs, &mut ga).unwrap();
        multilinear_gradient(&b, 2, &probs, &mut gb).unwrap();
        assert_eq!(ga, gb);
        let want = brute_all(&csr_ids, &csr_u, &b.rows, &probs, 2);
        for (x, y) in ga.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12);
        }
    }

    #[test]
    fn same_bits_for_any_threads() {
        let mut rng = XorShift::new(3);
        let (q, m, n) = (3000, 30, 5000);
        let (ids, util, probs) = random_case(&mut rng, q, m, n);
        let r = Retrievals::padded(&ids, &util, q, m, n).unwrap();
        let run = |t: usize, sampled: bool| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
            let mut g = vec![0.0; n];
            pool.install(|| {
                if sampled {
                    sampled_gradient(&r, 4, &probs, 0.2, 0.1, 9, &mut g).map(|_| ())
                } else {
                    multilinear_gradient(&r, 4, &probs, &mut g)
                }
            })
            .unwrap();
            g.iter().map(|x| x.to_bits()).collect::<Vec<u64>>()
        };
        for sampled in [false, true] {
            let one = run(1, sampled);
            assert_eq!(one, run(3, sampled));
            assert_eq!(one, run(4, sampled));
        }
    }

    #[test]
    fn sampled_is_within_eps() {
        let mut rng = XorShift::new(5);
        let (q, m, n) = (2, 8, 10);
        let (ids, util, probs) = random_case(&mut rng, q, m, n);
        let r = Retrievals::padded(&ids, &util, q, m, n).unwrap();
        let mut exact = vec![0.0; n];
        multilinear_gradient(&r, 2, &probs, &mut exact).unwrap();
        let (eps, delta) = (0.1, 0.2);
        let mut fails = 0;
        let seeds = 40;
        for seed in 0..seeds {
            let mut g = vec![0.0; n];
            sampled_gradient(&r, 2, &probs, eps, delta, seed, &mut g).unwrap();
            fails += g.iter().zip(&exact).filter(|(a, b)| (*a - *b).abs() >= eps).count();
        }
        assert!((fails as f64) <= delta * (seeds as usize * n) as f64, "{fails} failures");
    }

    #[test]
    fn errors_name_the_argument() {
        let ids = [0i64, 1, 2, 2];
        let u = [1.0, 0.0, 1.0, 0.0];
        let msg = |r: Result<Retrievals<'_>>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(Retrievals::padded(&ids, &u, 2, 2, 3)).contains("appears twice in query 1"));
        assert!(msg(Retrievals::padded(&[0, 5], &u[..2], 1, 2, 3)).contains("id 5 at query 0, position 1 is out of range"));
        assert!(msg(Retrievals::padded(&[-1, 1], &u[..2], 1, 2, 3)).contains("after -1 padding"));
        assert!(msg(Retrievals::padded(&[0, 1], &[f64::NAN, 0.0], 1, 2, 3)).starts_with("utility: non-finite"));
        assert!(msg(Retrievals::padded(&[0, 1], &u[..1], 1, 2, 3)).starts_with("utility:"));
        assert!(msg(Retrievals::csr(&[0, 1], &u[..2], &[0, 2, 1], 3)).starts_with("indptr:"));
        assert!(msg(Retrievals::csr(&[0, -1], &u[..2], &[0, 2], 3)).contains("out of range"));
        // A long row: the repeat is found through the hash set's probing.
        let mut long: Vec<i64> = (0..100).map(|i| i * 1_000_003 % 7919).collect();
        long[73] = long[5];
        let lu = vec![0.0; 100];
        assert!(msg(Retrievals::padded(&long, &lu, 1, 100, 7919)).contains("twice in query 0 (positions 5 and 73)"));
        long[73] = 7918;
        assert!(Retrievals::padded(&long, &lu, 1, 100, 7919).is_ok());
        let r = Retrievals::padded(&[0, 1], &u[..2], 1, 2, 3).unwrap();
        let mut g = vec![0.0; 3];
        let e = multilinear_gradient(&r, 1, &[0.5, 1.5, 0.0], &mut g).unwrap_err().to_string();
        assert!(e.contains("probs: value 1.5 at index 1"), "{e}");
        assert!(multilinear_gradient(&r, 0, &[0.5; 3], &mut g).unwrap_err().to_string().starts_with("k:"));
        assert!(multilinear_gradient(&r, 1, &[0.5; 2], &mut g).unwrap_err().to_string().starts_with("probs:"));
    }

    #[test]
    fn grouped_sum_step_is_the_sum_of_item_gradients() {
        let mut rng = XorShift::new(13);
        let (q, m, n) = (20, 5, 12);
        let (ids, util, _) = random_case(&mut rng, q, m, n);
        let r = Retrievals::padded(&ids, &util, q, m, n).unwrap();
        let groups: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
        let mut v = vec![0.5; n];
        learn_importance(&r, 2, 0.1, 1, Some((&groups, GroupStep::Sum)), &mut v).unwrap();
        let mut g = vec![0.0; n];
        multilinear_gradient(&r, 2, &[0.5; 12], &mut g).unwrap();
        for (i, &x) in v.iter().enumerate() {
            let t: f64 = (0..n).filter(|&j| groups[j] == groups[i]).map(|j| g[j]).sum();
            assert!((x - (0.5 + 0.1 * t).clamp(0.0, 1.0)).abs() < 1e-15);
        }
    }
}
