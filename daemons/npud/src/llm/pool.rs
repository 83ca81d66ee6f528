//! The KV pool of a shared-buffer (GroupQueryAttention) model: for each
//! layer one K and one V buffer of `[rows, kv_heads, capacity, head_size]`
//! f32, a row per sequence. A batched step binds rows `0..n` as both the
//! `past` inputs and the `present` outputs, which the op writes in place;
//! a prefill binds one row. Rows are kept packed: when a sequence ends, the
//! last row's tokens move into its place.
//!
//! The tensors that bind a run of rows to a step are made the first time
//! that run of rows steps, and kept: a decode step then hands ONNX Runtime
//! the same values every token instead of making a hundred new ones.

use super::config::Shape;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions};
use ort::value::DynValue;
use std::alloc::Layout;
use std::collections::HashMap;
use std::ptr::NonNull;

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
    pub fn new(shape: &Shape, rows: usize, capacity: usize) -> Pool {
        let len = [shape.kv_heads, capacity, shape.head_size]
            .iter()
            .try_fold(rows, |n, &d| n.checked_mul(d))
            .expect("a KV pool's size fits in memory's address space");
        Pool {
            bindings: HashMap::new(),
            layers: (0..shape.layers)
                .map(|_| (Buffer::zeroed(len), Buffer::zeroed(len)))
                .collect(),
            rows,
            capacity,
            kv_heads: shape.kv_heads,
            head: shape.head_size,
            present_key: shape.present_key.clone(),
            present_value: shape.present_value.clone(),
        }
    }

    fn row_len(&self) -> usize {
        self.kv_heads * self.capacity * self.head
    }

    /// Copies the first `tokens` positions of row `from` into row `to`.
    pub fn move_row(&mut self, from: usize, to: usize, tokens: usize) {
        let (row, span, head) = (self.row_len(), self.capacity * self.head, self.head);
        assert!(from < self.rows && to < self.rows && tokens <= self.capacity);
        for (k, v) in &self.layers {
            for buf in [k, v] {
                for h in 0..self.kv_heads {
                    buf.copy(from * row + h * span, to * row + h * span, tokens * head);
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
    fn layout(len: usize) -> Layout {
        Layout::array::<f32>(len.max(1)).expect("a KV buffer's size")
    }

    /// Zeroed pages are mapped lazily: a row costs memory once used.
    fn zeroed(len: usize) -> Buffer {
        let layout = Buffer::layout(len);
        #[allow(unsafe_code)]
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            NonNull::new(ptr.cast()).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Buffer { ptr, len }
    }

    /// Copies `count` floats from index `src` to index `dst`.
    fn copy(&self, src: usize, dst: usize, count: usize) {
        assert!(src + count <= self.len && dst + count <= self.len);
        #[allow(unsafe_code)]
        // SAFETY: both ranges lie inside the buffer (checked above), which
        // lives while `self` does; `ptr::copy` allows them to overlap. No
        // run is in progress: runs borrow the pool, as does this copy.
        unsafe {
            std::ptr::copy(
                self.ptr.as_ptr().add(src),
                self.ptr.as_ptr().add(dst),
                count,
            )
        }
    }

    /// An ONNX Runtime tensor of `shape` over floats `offset..offset +
    /// count`, which it does not own.
    fn view(&self, offset: usize, count: usize, shape: &[i64; 4]) -> Result<DynValue, ort::Error> {
        use ort::AsPointer;
        assert!(offset + count <= self.len);
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
        #[allow(unsafe_code)]
        // SAFETY: allocated in `zeroed` with this layout, freed only here.
        unsafe {
            std::alloc::dealloc(self.ptr.as_ptr().cast(), Buffer::layout(self.len))
        }
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
