//! The KV pool of a shared-buffer (GroupQueryAttention) model: for each
//! layer one K and one V buffer of `[rows, kv_heads, capacity, head_size]`
//! f32, a row per sequence. A batched step binds rows `0..n` as both the
//! `past` inputs and the `present` outputs, which the op writes in place;
//! a prefill binds one row. Rows are kept packed: when a sequence ends, the
//! last row's tokens move into its place.

use ort::session::SessionInputValue;
use ort::value::DynValue;
use std::ptr::NonNull;

pub struct Pool {
    /// Per layer: (K, V), each `rows * row_len` floats.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    pub rows: usize,
    pub capacity: usize,
    kv_heads: usize,
    head: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} rows of {} tokens)", self.rows, self.capacity)
    }
}

impl Pool {
    pub fn new(layers: usize, rows: usize, capacity: usize, kv_heads: usize, head: usize) -> Pool {
        let len = rows * kv_heads * capacity * head;
        Pool {
            // Zeroed pages are mapped lazily: a row costs memory once used.
            layers: (0..layers)
                .map(|_| (vec![0f32; len], vec![0f32; len]))
                .collect(),
            rows,
            capacity,
            kv_heads,
            head,
        }
    }

    fn row_len(&self) -> usize {
        self.kv_heads * self.capacity * self.head
    }

    /// Copies the first `tokens` positions of row `from` into row `to`.
    pub fn move_row(&mut self, from: usize, to: usize, tokens: usize) {
        let (row, span, head) = (self.row_len(), self.capacity * self.head, self.head);
        for (k, v) in &mut self.layers {
            for buf in [k, v] {
                for h in 0..self.kv_heads {
                    let src = from * row + h * span;
                    let dst = to * row + h * span;
                    buf.copy_within(src..src + tokens * head, dst);
                }
            }
        }
    }

    /// Runs `f` on views of rows `first..first + n` of every layer, as
    /// (past K, past V, present K, present V): four tensors over the same
    /// two buffers. The views live only while `f` runs (it must not keep
    /// them), while the pool is borrowed.
    pub fn with_rows<T>(
        &mut self,
        first: usize,
        n: usize,
        f: impl FnOnce(Vec<[DynValue; 4]>) -> Result<T, ort::Error>,
    ) -> Result<T, ort::Error> {
        assert!(first + n <= self.rows, "rows {first}+{n} of {}", self.rows);
        let shape = [
            n as i64,
            self.kv_heads as i64,
            self.capacity as i64,
            self.head as i64,
        ];
        let offset = first * self.row_len();
        let count = n * self.row_len();
        let mut out = Vec::with_capacity(self.layers.len());
        for (k, v) in &mut self.layers {
            let (k, v) = (
                &mut k[offset..offset + count],
                &mut v[offset..offset + count],
            );
            out.push([
                view(k, &shape)?,
                view(v, &shape)?,
                view(k, &shape)?,
                view(v, &shape)?,
            ]);
        }
        f(out)
    }
}

/// Inputs for a step from [`Pool::with_rows`]'s views: the past halves.
pub fn past_inputs<'a>(
    views: &mut [[DynValue; 4]],
    keys: &[String],
    values: &[String],
) -> Vec<(String, SessionInputValue<'a>)> {
    let mut inputs = Vec::with_capacity(views.len() * 2);
    for (l, v) in views.iter_mut().enumerate() {
        let [k, val, _, _] = v;
        inputs.push((keys[l].clone(), SessionInputValue::Owned(take(k))));
        inputs.push((values[l].clone(), SessionInputValue::Owned(take(val))));
    }
    inputs
}

fn take(v: &mut DynValue) -> DynValue {
    std::mem::replace(v, placeholder())
}

fn placeholder() -> DynValue {
    ort::value::Tensor::<f32>::from_array(([0usize], Vec::<f32>::new()))
        .expect("an empty tensor")
        .into_dyn()
}

/// An ONNX Runtime tensor over `data` that does not own it.
fn view(data: &mut [f32], shape: &[i64; 4]) -> Result<DynValue, ort::Error> {
    use ort::AsPointer;
    let api = ort::api();
    let info = ort::memory::MemoryInfo::default();
    let mut value: *mut ort::sys::OrtValue = std::ptr::null_mut();
    #[allow(unsafe_code)]
    // SAFETY: `data` is valid for `data.len()` floats, which is exactly the
    // shape's element count (checked by the caller's slicing); the value
    // only points at it. Views are made only inside `Pool::with_rows`,
    // which holds the pool borrowed mutably while its closure runs the one
    // step they are for; they are dropped before it returns, so the
    // buffers neither move nor are freed while a view exists.
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            info.ptr(),
            data.as_mut_ptr().cast(),
            std::mem::size_of_val(data),
            shape.as_ptr(),
            shape.len(),
            ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
            &mut value,
        )
    };
    check(status)?;
    let ptr =
        NonNull::new(value).ok_or_else(|| ort::Error::new("ONNX Runtime returned no tensor"))?;
    #[allow(unsafe_code)]
    // SAFETY: `ptr` is the OrtValue just created, owned by nothing else;
    // the Value releases it (not the data, which it never owned) on drop.
    Ok(unsafe { ort::value::Value::from_ptr(ptr, Some(&ort::memory::Allocator::default())) })
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
