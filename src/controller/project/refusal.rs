//! What the API server's refusal to create a worker pod means for the run: it heals by itself (retried with backoff until
//! the scheduling timeout) or it does not (the run is blocked until its spec
//! changes). Pure: unit-tested on the errors the API server returns.

/// A refused write, in the API server's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What was refused, for example `Pod llm-worker-1`.
    pub object: String,
    /// Whether it can heal without a change of the spec.
    pub heals: bool,
    /// The condition reason: Invalid, PodSecurity, ReferenceNotFound,
    /// Forbidden, BadRequest, QuotaExceeded, TooManyRequests, Conflict,
    /// ServerError, Unreachable.
    pub reason: &'static str,
    /// What the API server said (status code and message).
    pub message: String,
}

/// The refusal an error is, or `None` when the object already exists (an
/// earlier create that the store does not show yet).
pub fn classify(object: String, err: &kube::Error) -> Option<Refusal> {
    let refusal = |heals, reason, message| Some(Refusal { object: object.clone(), heals, reason, message });
    let kube::Error::Api(s) = err else {
        // No answer at all (connection, timeout): the API server is away.
        return refusal(true, "Unreachable", err.to_string());
    };
    if s.is_already_exists() {
        return None;
    }
    let message = format!("{} {}: {}", s.code, if s.reason.is_empty() { "Failure" } else { &s.reason }, s.message);
    let m = s.message.as_str();
    match s.code {
        422 => refusal(false, "Invalid", message),
        400 => refusal(false, "BadRequest", message),
        // The quota's usage is recomputed after a restart and frees as runs
        // end: retried, and the scheduling timeout bounds what it holds.
        403 if m.contains("exceeded quota") || m.contains("status unknown for quota") => {
            refusal(true, "QuotaExceeded", message)
        }
        403 if m.contains("violates PodSecurity") => refusal(false, "PodSecurity", message),
        // A missing ServiceAccount or PriorityClass (admission plugins say "not found").
        403 if m.contains("not found") || m.contains("was found") => refusal(false, "ReferenceNotFound", message),
        403 => refusal(false, "Forbidden", message),
        429 => refusal(true, "TooManyRequests", message),
        409 => refusal(true, "Conflict", message),
        c if c >= 500 => refusal(true, "ServerError", message),
        _ => refusal(true, "Refused", message),
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Status::failure(message, reason).with_code(code).boxed())
    }

    #[test]
    fn refusals_that_heal_are_told_from_those_that_do_not() {
        let cases: &[(kube::Error, Option<(bool, &str)>)] = &[
            (
                api(
                    422,
                    "Invalid",
                    "Pod \"a.b-worker-0\" is invalid: spec.hostname: Invalid value: \"a.b-worker-0\": a lowercase RFC 1123 label",
                ),
                Some((false, "Invalid")),
            ),
            (
                api(422, "Invalid", "spec.containers[0].volumeMounts[0].name: Not found: \"data\""),
                Some((false, "Invalid")),
            ),
            (
                api(
                    403,
                    "Forbidden",
                    "pods \"x\" is forbidden: violates PodSecurity \"restricted:latest\": runAsNonRoot != true",
                ),
                Some((false, "PodSecurity")),
            ),
            (
                api(
                    403,
                    "Forbidden",
                    "pods \"x\" is forbidden: error looking up service account team/trainer: serviceaccount \"trainer\" not found",
                ),
                Some((false, "ReferenceNotFound")),
            ),
            (
                api(403, "Forbidden", "pods \"x\" is forbidden: no PriorityClass with name urgent was found"),
                Some((false, "ReferenceNotFound")),
            ),
            (
                api(
                    403,
                    "Forbidden",
                    "pods \"x\" is forbidden: exceeded quota: cpu, requested: requests.cpu=2, used: requests.cpu=2, limited: requests.cpu=3",
                ),
                Some((true, "QuotaExceeded")),
            ),
            (
                api(403, "Forbidden", "status unknown for quota: cpu, resources: requests.cpu"),
                Some((true, "QuotaExceeded")),
            ),
            (
                api(403, "Forbidden", "pods \"x\" is forbidden: maximum cpu usage per Container is 1"),
                Some((false, "Forbidden")),
            ),
            (api(400, "BadRequest", "bad"), Some((false, "BadRequest"))),
            (api(429, "TooManyRequests", "slow down"), Some((true, "TooManyRequests"))),
            (api(500, "InternalError", "etcd"), Some((true, "ServerError"))),
            (api(503, "ServiceUnavailable", "later"), Some((true, "ServerError"))),
            (api(409, "Conflict", "the object has been modified"), Some((true, "Conflict"))),
            (api(409, "AlreadyExists", "pods \"x\" already exists"), None),
        ];
        for (err, want) in cases {
            let got = classify("Pod x".into(), err);
            assert_eq!(got.as_ref().map(|r| (r.heals, r.reason)), *want, "{err}");
            if let (Some(r), kube::Error::Api(s)) = (&got, err) {
                assert!(r.message.contains(&s.message), "the API server's words are kept: {}", r.message);
                assert!(r.message.starts_with(&s.code.to_string()), "{}", r.message);
            }
        }
    }
}
