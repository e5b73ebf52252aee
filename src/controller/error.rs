use thiserror::Error;

/// Errors of a reconcile. `category` is a stable, bounded name used as the
/// metric label and the Event reason.
#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("cannot serialize: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the cache has not caught up with {0} yet")]
    NotInCache(String),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApiError",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Serialize(_) => "SerializeError",
            Error::Finalizer(_) => "FinalizerError",
            Error::NotInCache(_) => "NotInCache",
        }
    }

    /// Invalid specs wait for the user to change the object; everything else is
    /// retried with backoff.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Error::InvalidSpec(_))
    }
}
