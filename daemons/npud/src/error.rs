/// What can go wrong in the runtime, each with the D-Bus error name a client
/// sees (`org.pocketos.Error.<name>`).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime is not available: {0}")]
    LibraryMissing(String),
    #[error("{0}")]
    ProviderUnavailable(String),
    #[error("model {0:?} is not installed")]
    NotInstalled(String),
    #[error("model {0:?} is not loaded")]
    NotLoaded(String),
    #[error("model {name:?} cannot be loaded: {detail}")]
    Corrupt { name: String, detail: String },
    #[error("model {name:?} needs {needed} MiB of memory but only {free} MiB of the {budget} MiB budget is free")]
    OverBudget {
        name: String,
        needed: u64,
        free: u64,
        budget: u64,
    },
    #[error("{0}")]
    InvalidInput(String),
    #[error("the prompt is {prompt} tokens, but the context holds {limit} (and at least one token must be generated)")]
    ContextTooLong { prompt: usize, limit: usize },
    #[error("{0}")]
    Busy(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("{0}")]
    Peer(String),
}

impl RuntimeError {
    pub fn name(&self) -> &'static str {
        match self {
            RuntimeError::LibraryMissing(_) => "RuntimeUnavailable",
            RuntimeError::ProviderUnavailable(_) => "ProviderUnavailable",
            RuntimeError::NotInstalled(_) | RuntimeError::NotLoaded(_) => "NotFound",
            RuntimeError::Corrupt { .. } => "Corrupt",
            RuntimeError::OverBudget { .. } => "InsufficientMemory",
            RuntimeError::InvalidInput(_) => "InvalidArgument",
            RuntimeError::ContextTooLong { .. } => "ContextTooLong",
            RuntimeError::Busy(_) => "Busy",
            RuntimeError::Inference(_) => "Inference",
            RuntimeError::Peer(_) => "PeerUnavailable",
        }
    }
}
