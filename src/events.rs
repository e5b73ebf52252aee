//! An Event a pure decision asks to publish (the apply layer publishes it).

pub use kube::runtime::events::EventType;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub type_: EventType,
    /// The Event's reason: a stable CamelCase word.
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn new(warning: bool, reason: &'static str, message: impl Into<String>) -> Self {
        let type_ = if warning { EventType::Warning } else { EventType::Normal };
        Self { type_, reason, message: message.into() }
    }

    pub fn normal(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(false, reason, message)
    }

    pub fn warning(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(true, reason, message)
    }

    pub fn is_warning(&self) -> bool {
        self.type_ == EventType::Warning
    }
}
