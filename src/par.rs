//! Per-slice work shared out between the cores. A job's slice loops (a
//! series' file reads, the airways the arch level follows, the heart region,
//! Agatston's lesions) have slices that do not depend on each other, and the
//! other jobs of a series wait for some of them, so they run on every core.
//!
//! Invariant: work is cut into contiguous runs and the results come back in
//! the runs' order, so the output is what one thread gives, in the same
//! order. A panic in a run is resumed in the caller, as if it had run there.

use std::thread::ScopedJoinHandle;

use ndarray::{ArrayViewMut3, Axis};

/// More threads than this gain little for one job: a worker runs jobs side
/// by side too.
const MAX_THREADS: usize = 4;

/// Threads for one job's slice loop: the cores, at most [`MAX_THREADS`].
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |t| t.get()).clamp(1, MAX_THREADS)
}

/// `f` of each of up to `threads` contiguous runs of `items`, side by side,
/// in the order of the runs (one run, on this thread, when `threads` ≤ 1 or
/// there are fewer than two items).
pub fn map_runs<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&[T]) -> R + Sync) -> Vec<R> {
    if threads <= 1 || items.len() < 2 {
        return vec![f(items)];
    }
    let f = &f;
    std::thread::scope(|sc| {
        let handles: Vec<_> = items.chunks(items.len().div_ceil(threads)).map(|run| sc.spawn(move || f(run))).collect();
        handles.into_iter().map(join).collect()
    })
}

/// [`map_runs`] over the slices (axis 0) of `a`, to be written in place:
/// `f(first, run)` gets each contiguous run of slices and the index of its
/// first slice.
pub fn map_slice_runs<A: Send, R: Send>(
    mut a: ArrayViewMut3<'_, A>,
    threads: usize,
    f: impl Fn(usize, ArrayViewMut3<'_, A>) -> R + Sync,
) -> Vec<R> {
    let n = a.dim().0;
    if threads <= 1 || n < 2 {
        return vec![f(0, a)];
    }
    let per = n.div_ceil(threads);
    let f = &f;
    std::thread::scope(|sc| {
        let handles: Vec<_> = a
            .axis_chunks_iter_mut(Axis(0), per)
            .enumerate()
            .map(|(k, run)| sc.spawn(move || f(k * per, run)))
            .collect();
        handles.into_iter().map(join).collect()
    })
}

/// The result of a scoped thread, its panic resumed here.
fn join<R>(h: ScopedJoinHandle<'_, R>) -> R {
    h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_come_back_in_order_and_cover_every_item_once() {
        let items: Vec<usize> = (0..103).collect();
        for threads in [1, 2, 3, 4, 200] {
            let runs = map_runs(&items, threads, |run| run.to_vec());
            assert!(runs.len() <= threads.max(1), "{threads}: {} runs", runs.len());
            assert_eq!(runs.concat(), items, "{threads} threads");
        }
        assert_eq!(map_runs(&[7], 4, |run| run.len()), vec![1]);
        assert_eq!(map_runs::<u8, usize>(&[], 4, |run| run.len()), vec![0]);
    }

    #[test]
    fn slice_runs_write_every_slice_once_knowing_its_index() {
        for threads in [1, 2, 3, 4, 9] {
            let mut a = ndarray::Array3::<usize>::zeros((7, 2, 3));
            let firsts = map_slice_runs(a.view_mut(), threads, |first, mut run| {
                for (j, mut slice) in run.axis_iter_mut(Axis(0)).enumerate() {
                    slice.mapv_inplace(|v| v + first + j + 1);
                }
                first
            });
            assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{threads}: {firsts:?}");
            for (s, slice) in a.axis_iter(Axis(0)).enumerate() {
                assert!(slice.iter().all(|&v| v == s + 1), "{threads} threads, slice {s}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "run 2")]
    fn a_panic_in_a_run_reaches_the_caller() {
        let items: Vec<usize> = (0..4).collect();
        map_runs(&items, 4, |run| assert!(run[0] != 2, "run {}", run[0]));
    }
}
