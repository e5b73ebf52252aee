use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

use crate::cli::RunArgs;
use crate::telemetry::{ControllerLabels, ErrorLabels, Metrics};

use super::Error;

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub node_grace: Duration,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, args: &RunArgs) -> Arc<Self> {
        let reporter = Reporter {
            controller: super::FIELD_MANAGER.into(),
            instance: args.identity.clone(),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            node_grace: Duration::from_secs(args.node_grace_seconds),
        })
    }

    pub fn count_reconcile(&self, controller: &'static str) {
        self.metrics
            .reconciliations
            .get_or_create(&ControllerLabels { controller })
            .inc();
    }

    pub fn count_error(&self, controller: &'static str, error: &Error) {
        self.metrics
            .reconcile_errors
            .get_or_create(&ErrorLabels {
                controller,
                category: error.category(),
            })
            .inc();
    }

    pub fn observe_duration(&self, controller: &'static str, seconds: f64) {
        self.metrics
            .reconcile_duration
            .get_or_create(&ControllerLabels { controller })
            .observe(seconds);
    }
}
