//! sovereign-operator: allocates a national AI computing center's GPUs and
//! domestic NPUs to tenant organisations and their training runs.
//!
//! - [`api`]: the custom resources (`sovereign.ai/v1alpha1`).
//! - [`planner`]: pure decisions from plain snapshots (no client).
//! - [`snapshot`]: Kubernetes objects to planner types.
//! - [`controller`]: reflectors, reconcilers and the apply layer.
//! - [`leader`]: leader election that never lets two replicas act at once.
//! - [`plan`]: what the operator would do with proposed objects (read-only).
//! - [`report`]: the center's use, by program, tenant and pool (read-only).
//! - [`admin`], [`telemetry`]: probes, metrics and logs.
//! - [`reference`]: the generated API and CLI reference pages of the docs.
//! - [`version`]: the version (from the release tag) and commit of this build.

pub mod admin;
pub mod admission;
pub mod api;
pub mod cli;
pub mod controller;
pub mod crdgen;
pub mod events;
pub mod kubeclient;
pub mod leader;
pub mod plan;
pub mod planner;
pub mod reference;
pub mod report;
pub mod snapshot;
pub mod telemetry;
pub mod version;
pub mod workload;
