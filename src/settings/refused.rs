//! Bottlerocket settings that Berth refuses, each with the reason and what to use instead.
//!
//! A Bottlerocket key that has no meaning on Berth is never accepted and ignored: user data
//! written for Bottlerocket either does what it says, or is refused as a whole with a message
//! that names the key, why, and the alternative. Keys Bottlerocket has only on some variants
//! (`settings.aws` on aws-*) are accepted only on the Berth variant where they mean something.
//! Keys no Bottlerocket version has stay "unknown field" errors from the typed model.
//!
//! The table is checked before the model, so that a refused key gets its reason rather than
//! serde's "unknown field". Every entry is listed in docs/settings.md.

use serde_json::Value;

/// A refused key: its dotted path under `settings`, and the message.
pub struct Refusal {
    pub key: &'static str,
    pub why: &'static str,
}

/// Refused whatever their value. Paths are dotted from `settings.`.
pub const REFUSED: &[Refusal] = &[
    Refusal {
        key: "metrics.metrics-url",
        why: "Berth sends no metrics, so there is no metrics URL; service health is in \
              GET /services",
    },
    Refusal {
        key: "metrics.service-checks",
        why: "Berth sends no metrics, so there are no health pings to fill; service health \
              is in GET /services",
    },
    Refusal {
        key: "ecs",
        why: "Berth has no ECS variant; run kubelet (settings.kubernetes) or containers \
              through containerd",
    },
    Refusal {
        key: "autoscaling",
        why: "Berth does not wait for or complete Auto Scaling lifecycle hooks; complete them \
              from outside (e.g. when GET /boot reports the node ready)",
    },
    Refusal {
        key: "cloudformation",
        why: "Berth does not signal CloudFormation; signal from outside once GET /boot reports \
              the node ready",
    },
    Refusal {
        key: "oci-hooks",
        why: "Berth ships no OCI hooks (Bottlerocket's log4j hot patch hook has no function \
              there either); remove the key",
    },
    Refusal { key: "nvidia-container-runtime", why: "Berth has no NVIDIA variant" },
    Refusal {
        key: "kubelet-device-plugins",
        why: "Berth has no NVIDIA variant, so no device plugins to configure",
    },
    Refusal {
        key: "kernel.modules",
        why: "Berth's kernel has its drivers built in and loads no modules; remove the key",
    },
    Refusal {
        key: "kubernetes.hostname-override-source",
        why: "Berth generates no hostname override on EC2; set \
              settings.kubernetes.hostname-override instead",
    },
    Refusal {
        key: "kubernetes.authentication-mode",
        why: "only \"tls\" is supported: Berth has no aws-iam-authenticator, kubelet joins \
              with settings.kubernetes.bootstrap-token (TLS bootstrap)",
    },
];

/// Groups Bottlerocket has only on its AWS variants.
pub const AWS_ONLY: &[&str] = &["aws"];

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(v, |v, k| v.as_object()?.get(k)).filter(|v| !v.is_null())
}

/// The first refused key in `settings` (JSON without the `settings.` prefix) for `variant`
/// (None: any variant, for host tools), as (`settings.KEY`, message).
pub fn check(settings: &Value, variant: Option<&str>) -> Option<(String, String)> {
    for r in REFUSED {
        let Some(v) = get(settings, r.key) else { continue };
        if r.key == "kubernetes.authentication-mode" && v.as_str() == Some("tls") {
            continue;
        }
        return Some((format!("settings.{}", r.key), r.why.to_string()));
    }
    if get(settings, "metrics.send-metrics") == Some(&Value::Bool(true)) {
        return Some((
            "settings.metrics.send-metrics".into(),
            "Berth sends no metrics (no usage or health pings to anyone); set it to false or \
             leave it out"
                .into(),
        ));
    }
    if let Some(v) = variant.filter(|v| *v != "aws") {
        for g in AWS_ONLY {
            if get(settings, g).is_some() {
                return Some((
                    format!("settings.{g}"),
                    format!(
                        "only on the aws variant (this is the {v} variant); it configures AWS \
                         access, which nothing here uses"
                    ),
                ));
            }
        }
    }
    None
}
