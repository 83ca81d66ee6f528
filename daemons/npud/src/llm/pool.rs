//! The KV pool of a shared-buffer (GroupQueryAttention) model: for each
//! layer one K and one V buffer of `[rows, kv_heads, capacity, head_size]`
//! f32, a row per sequence. A batched step binds rows `0..n` as both the
//! `past` inputs and the `present` outputs, which the op writes in place;
//! a prefill binds one row. Rows are kept packed: when a sequence ends, the
//! last row's tokens move into its place.
//!
//! Every row holds as many tokens, as one tensor binds them all. A request
//! that needs more than that lays the pool out anew with longer rows
//! ([`Pool::relayout`]), its cached tokens copied across; the engine lays
//! it out at its usual length again once nothing runs. Rows' pages are
//! mapped as they are first written, so longer rows cost memory only for
//! the tokens they hold.
//!
//! The tensors that bind a run of rows to a step are made the first time
//! that run of rows steps, and kept: a decode step then hands ONNX Runtime
//! the same values every token instead of making a hundred new ones.

use super::config::Shape;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions};
use ort::value::DynValue;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

/// The memory for a pool's buffers could not be had.
#[derive(Debug, thiserror::Error)]
#[error("the KV cache of {rows} rows of {capacity} tokens ({mib} MiB) could not be allocated")]
pub struct NoMemory {
    rows: usize,
    capacity: usize,
    mib: u64,
}

/// A step's tensors for a run of rows.
pub struct Binding {
    /// Per layer, the past K and V: the step's inputs.
    pub past: Vec<(DynValue, DynValue)>,
    /// Run options whose preallocated `present` outputs are the same rows.
    pub options: RunOptions<HasSelectedOutputs>,
}

pub struct Pool {
    /// By (first row, rows). Declared before `layers`, so dropped before
    /// the buffers they point into.
    bindings: HashMap<(usize, usize), Binding>,
    /// Per layer: (K, V), each `rows * row_len` floats.
    layers: Vec<(Buffer, Buffer)>,
    pub rows: usize,
    pub capacity: usize,
    kv_heads: usize,
    head: usize,
    present_key: Vec<String>,
    present_value: Vec<String>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} rows of {} tokens)", self.rows, self.capacity)
    }
}

impl Pool {
    pub fn new(shape: &Shape, rows: usize, capacity: usize) -> Result<Pool, NoMemory> {
        Pool::with_names(
            shape.layers,
            rows,
            capacity,
            shape.kv_heads,
            shape.head_size,
            shape.present_key.clone(),
            shape.present_value.clone(),
        )
    }

    fn with_names(
        layers: usize,
        rows: usize,
        capacity: usize,
        kv_heads: usize,
        head: usize,
        present_key: Vec<String>,
        present_value: Vec<String>,
    ) -> Result<Pool, NoMemory> {
        let len = [kv_heads, capacity, head]
            .iter()
            .try_fold(rows, |n, &d| n.checked_mul(d));
        let no_memory = || NoMemory {
            rows,
            capacity,
            mib: len.map_or(u64::MAX, |n| {
                (n as u64)
                    .saturating_mul(4)
                    .saturating_mul(2 * layers as u64)
                    >> 20
            }),
        };
        let len = len.ok_or_else(no_memory)?;
        let layers = (0..layers)
            .map(|_| Some((Buffer::zeroed(len)?, Buffer::zeroed(len)?)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(no_memory)?;
        Ok(Pool {
            bindings: HashMap::new(),
            layers,
            rows,
            capacity,
            kv_heads,
            head,
            present_key,
            present_value,
        })
    }

    fn row_len(&self) -> usize {
        self.kv_heads * self.capacity * self.head
    }

    /// Lays the pool out with rows of `capacity` tokens, keeping the first
    /// `tokens` positions of each `(row, tokens)` of `keep`; every other
    /// row is left empty. The old buffers go once their tokens are copied;
    /// without memory for the new ones, the pool stays as it was.
    pub fn relayout(&mut self, capacity: usize, keep: &[(usize, usize)]) -> Result<(), NoMemory> {
        let new = Pool::with_names(
            self.layers.len(),
            self.rows,
            capacity,
            self.kv_heads,
            self.head,
            self.present_key.clone(),
            self.present_value.clone(),
        )?;
        let head = self.head;
        for (old, fresh) in self.layers.iter().zip(&new.layers) {
            for (from, to) in [(&old.0, &fresh.0), (&old.1, &fresh.1)] {
                for &(row, tokens) in keep {
                    assert!(row < self.rows && tokens <= self.capacity.min(capacity));
                    for h in 0..self.kv_heads {
                        to.copy_from(
                            from,
                            row * self.row_len() + h * self.capacity * head,
                            row * new.row_len() + h * capacity * head,
                            tokens * head,
                        );
                    }
                }
            }
        }
        // Dropped field by field: the old bindings, which point into the
        // old buffers, go before them.
        *self = new;
        Ok(())
    }

    /// Copies the first `tokens` positions of row `from` into row `to`.
    pub fn move_row(&mut self, from: usize, to: usize, tokens: usize) {
        let (row, span, head) = (self.row_len(), self.capacity * self.head, self.head);
        assert!(from < self.rows && to < self.rows && tokens <= self.capacity);
        for (k, v) in &self.layers {
            for buf in [k, v] {
                for h in 0..self.kv_heads {
                    buf.copy_from(
                        buf,
                        from * row + h * span,
                        to * row + h * span,
                        tokens * head,
                    );
                }
            }
        }
    }

    /// The tensors that bind rows `first..first + n` of every layer to a
    /// step, made on first use.
    pub fn binding(&mut self, first: usize, n: usize) -> Result<&Binding, ort::Error> {
        assert!(first + n <= self.rows, "rows {first}+{n} of {}", self.rows);
        if !self.bindings.contains_key(&(first, n)) {
            let shape = [
                n as i64,
                self.kv_heads as i64,
                self.capacity as i64,
                self.head as i64,
            ];
            let (offset, count) = (first * self.row_len(), n * self.row_len());
            let mut past = Vec::with_capacity(self.layers.len());
            let mut selector = OutputSelector::default();
            for (l, (k, v)) in self.layers.iter().enumerate() {
                past.push((
                    k.view(offset, count, &shape)?,
                    v.view(offset, count, &shape)?,
                ));
                selector = selector
                    .preallocate(&self.present_key[l], k.view(offset, count, &shape)?)
                    .preallocate(&self.present_value[l], v.view(offset, count, &shape)?);
            }
            let options = RunOptions::new()?.with_outputs(selector);
            self.bindings.insert((first, n), Binding { past, options });
        }
        Ok(&self.bindings[&(first, n)])
    }
}

/// Zeroed floats that only ONNX Runtime (through views) and
/// [`Pool::move_row`] touch, through pointers; no Rust reference to them
/// is ever made, so views may point at them for as long as they live.
struct Buffer {
    ptr: NonNull<f32>,
    len: usize,
}

impl Buffer {
    /// The buffer's size in bytes; None past the address space.
    fn bytes(len: usize) -> Option<NonZeroUsize> {
        NonZeroUsize::new(len.max(1).checked_mul(std::mem::size_of::<f32>())?)
    }

    /// Whether floats `start..start + count` lie inside the buffer (an end
    /// past the address space does not).
    fn holds(&self, start: usize, count: usize) -> bool {
        start.checked_add(count).is_some_and(|end| end <= self.len)
    }

    /// Zeroed pages are mapped lazily: a row costs memory once used, a
    /// small page at a time, also where the system backs memory with huge
    /// pages (a huge page would be zeroed whole at a row's first token,
    /// 2 MiB at a time, in the middle of a request). None when the system
    /// refuses the memory.
    fn zeroed(len: usize) -> Option<Buffer> {
        use nix::sys::mman::{madvise, mmap_anonymous, MapFlags, MmapAdvise, ProtFlags};
        let bytes = Buffer::bytes(len)?;
        #[allow(unsafe_code)]
        // SAFETY: a new private anonymous mapping, at an address the system
        // chooses; it overlaps nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .ok()?;
        // Refused where the kernel has no huge pages at all: nothing to do.
        #[allow(unsafe_code)]
        // SAFETY: advice over exactly the mapping just made; it changes no
        // contents.
        let _ = unsafe { madvise(ptr, bytes.get(), MmapAdvise::MADV_NOHUGEPAGE) };
        Some(Buffer {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Copies `count` floats from index `src` of `from` (this buffer or
    /// another) to index `dst` of this one.
    fn copy_from(&self, from: &Buffer, src: usize, dst: usize, count: usize) {
        assert!(from.holds(src, count) && self.holds(dst, count));
        #[allow(unsafe_code)]
        // SAFETY: both ranges lie inside their buffers (checked above),
        // which live while the references do; `ptr::copy` allows the ranges
        // to overlap (when `from` is this buffer). No run is in progress:
        // runs borrow the pool, as do the move and the relayout that copy.
        unsafe {
            std::ptr::copy(
                from.ptr.as_ptr().add(src),
                self.ptr.as_ptr().add(dst),
                count,
            )
        }
    }

    /// An ONNX Runtime tensor of `shape` over floats `offset..offset +
    /// count`, which it does not own.
    fn view(&self, offset: usize, count: usize, shape: &[i64; 4]) -> Result<DynValue, ort::Error> {
        use ort::AsPointer;
        assert!(self.holds(offset, count));
        assert_eq!(shape.iter().product::<i64>(), count as i64);
        let api = ort::api();
        let info = ort::memory::MemoryInfo::default();
        let mut value: *mut ort::sys::OrtValue = std::ptr::null_mut();
        #[allow(unsafe_code)]
        // SAFETY: the range lies inside the buffer and holds exactly the
        // shape's element count (both checked above); the value only points
        // at it. ONNX Runtime writes a preallocated output only within its
        // element count (a run that needs more is refused), whatever shapes
        // a model declares. The value and its clones (a run's inputs and
        // outputs hold some) go before the buffers: the bindings come first
        // among the pool's fields, and `step` drops its run's outputs
        // before it returns. ONNX Runtime reads or writes through them only
        // during a run, which holds the pool borrowed mutably, so
        // `move_row` never runs beside it.
        let status = unsafe {
            (api.CreateTensorWithDataAsOrtValue)(
                info.ptr(),
                self.ptr.as_ptr().add(offset).cast(),
                count * std::mem::size_of::<f32>(),
                shape.as_ptr(),
                shape.len(),
                ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                &mut value,
            )
        };
        check(status)?;
        let ptr = NonNull::new(value)
            .ok_or_else(|| ort::Error::new("ONNX Runtime returned no tensor"))?;
        #[allow(unsafe_code)]
        // SAFETY: `ptr` is the OrtValue just created, owned by nothing else;
        // the Value releases it (not the data, which it never owned) on drop.
        Ok(unsafe { ort::value::Value::from_ptr(ptr, Some(&ort::memory::Allocator::default())) })
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let bytes = Buffer::bytes(self.len).expect("mapped with this size");
        #[allow(unsafe_code)]
        // SAFETY: mapped in `zeroed` with this size, unmapped only here;
        // no view outlives the buffer (see `view`).
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), bytes.get()) };
    }
}

fn check(status: ort::sys::OrtStatusPtr) -> Result<(), ort::Error> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    #[allow(unsafe_code)]
    // SAFETY: a non-null status from ONNX Runtime: its message is a C
    // string it owns until the status is released, which happens after the
    // message is copied.
    let message = unsafe {
        let m = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        m
    };
    Err(ort::Error::new(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// K of (row, head, position, dim): its own number, and V its negative.
    fn value(r: usize, h: usize, p: usize, d: usize) -> f32 {
        (1000 * r + 100 * h + 10 * p + d + 1) as f32
    }

    fn at(pool: &Pool, r: usize, h: usize, p: usize, d: usize) -> usize {
        r * pool.row_len() + h * pool.capacity * pool.head + p * pool.head + d
    }

    fn cells(pool: &Pool) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let (rows, heads, cap, head) = (pool.rows, pool.kv_heads, pool.capacity, pool.head);
        (0..rows).flat_map(move |r| {
            (0..heads)
                .flat_map(move |h| (0..cap).flat_map(move |p| (0..head).map(move |d| (r, h, p, d))))
        })
    }

    impl Buffer {
        fn get(&self, i: usize) -> f32 {
            assert!(i < self.len);
            #[allow(unsafe_code)]
            // SAFETY: inside the buffer (checked above); nothing else
            // touches it in these tests.
            unsafe {
                *self.ptr.as_ptr().add(i)
            }
        }

        fn set(&self, i: usize, x: f32) {
            assert!(i < self.len);
            #[allow(unsafe_code)]
            // SAFETY: as in `get`.
            unsafe {
                *self.ptr.as_ptr().add(i) = x
            }
        }
    }

    #[test]
    fn the_pool_is_kept_off_huge_pages() {
        // Where the system backs memory with huge pages unasked (Linux's
        // `always`), each mapping of the pool is still marked `nh`.
        let names = |p: &str| vec![format!("{p}.0"), format!("{p}.1")];
        let pool = Pool::with_names(2, 4, 1024, 3, 64, names("k"), names("v")).unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let flags = |addr: usize| -> String {
            let mut inside = false;
            for line in smaps.lines() {
                let range = line
                    .split_whitespace()
                    .next()
                    .and_then(|r| r.split_once('-'));
                if let Some((a, b)) = range {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
                if let Some(f) = line.strip_prefix("VmFlags:").filter(|_| inside) {
                    return f.to_string();
                }
            }
            panic!("no mapping holds {addr:#x}");
        };
        for (k, v) in &pool.layers {
            for b in [k, v] {
                let f = flags(b.ptr.as_ptr() as usize);
                assert!(f.split_whitespace().any(|x| x == "nh"), "VmFlags:{f}");
            }
        }
    }

    #[test]
    fn a_relayout_keeps_the_tokens_it_is_told_to_and_nothing_else() {
        let names = |p: &str| vec![format!("{p}.0"), format!("{p}.1")];
        let mut pool = Pool::with_names(2, 3, 4, 2, 2, names("k"), names("v")).unwrap();
        for (r, h, p, d) in cells(&pool).collect::<Vec<_>>() {
            let i = at(&pool, r, h, p, d);
            for (k, v) in &pool.layers {
                k.set(i, value(r, h, p, d));
                v.set(i, -value(r, h, p, d));
            }
        }
        let check = |pool: &Pool, kept: &[(usize, usize)]| {
            for (r, h, p, d) in cells(pool) {
                let want = match kept.iter().any(|&(row, n)| row == r && p < n) {
                    true => value(r, h, p, d),
                    false => 0.0,
                };
                let i = at(pool, r, h, p, d);
                for (k, v) in &pool.layers {
                    assert_eq!(k.get(i), want, "K row {r} head {h} position {p}");
                    assert_eq!(v.get(i), -want, "V row {r} head {h} position {p}");
                }
            }
        };
        // Longer rows: rows 0 and 2 keep 3 and 4 tokens, row 1 is emptied.
        pool.relayout(7, &[(0, 3), (2, 4)]).unwrap();
        assert_eq!((pool.rows, pool.capacity), (3, 7));
        check(&pool, &[(0, 3), (2, 4)]);
        // And back: only row 2's first 2 tokens stay.
        pool.relayout(4, &[(2, 2)]).unwrap();
        assert_eq!(pool.capacity, 4);
        check(&pool, &[(2, 2)]);
        // A range whose end is past the address space is outside.
        let k = &pool.layers[0].0;
        assert!(k.holds(k.len - 1, 1) && !k.holds(k.len, 1) && !k.holds(usize::MAX, 2));
        // Rows beyond the address space are refused, the pool kept whole.
        let err = pool.relayout(usize::MAX / 2, &[(2, 2)]).unwrap_err();
        assert!(err.to_string().contains("could not be allocated"), "{err}");
        check(&pool, &[(2, 2)]);
    }
}
