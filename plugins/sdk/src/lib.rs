//! The keyway plugin SDK: a policy is a small trait impl plus one macro.
//!
//! ```ignore
//! use keyway_plugin_sdk::health::*;
//!
//! struct AlwaysUp;
//! impl HealthPolicy for AlwaysUp {
//!     fn configure(_config: serde_json::Value) -> Result<Self, String> { Ok(AlwaysUp) }
//!     fn evaluate(&self, _b: &Backend, _c: Health, _h: &[Probe], _now: u64) -> Verdict {
//!         Verdict { health: Health::Healthy, reason: String::new() }
//!     }
//! }
//! keyway_plugin_sdk::health_policy!(AlwaysUp);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file is the
//! plugin. The contract is `wit/policy.wit` (`keyway:policy@0.1.0`), of which this crate
//! carries its own copy (a test keeps it byte-identical to keyway's), so it builds
//! outside keyway's repository too (`keyway plugin new`); this crate wraps
//! its generated bindings. `configure` runs once per plugin instance with the plugin's
//! TOML table as JSON; what it returns is the policy value later calls use.

// The generated bindings name this crate by its external name, also from inside it.
extern crate self as keyway_plugin_sdk;

#[doc(hidden)]
pub use serde_json as __json;
#[doc(hidden)]
pub use wit_bindgen as __rt;

/// Health policies: judge a backend from its recent checks.
pub mod health {
    wit_bindgen::generate!({
        world: "health",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_health",
        default_bindings_module: "keyway_plugin_sdk::health",
        runtime_path: "keyway_plugin_sdk::__rt::rt",
    });

    pub use exports::keyway::policy::health_policy::{Guest, Verdict};
    pub use keyway::policy::types::{Backend, Health, Probe, Role};

    /// A health policy.
    pub trait HealthPolicy: Sized + Send + 'static {
        /// Builds the policy from its configuration, or says what is wrong with it.
        fn configure(config: serde_json::Value) -> Result<Self, String>;
        /// Judges `backend` from `history` (oldest first, newest last).
        fn evaluate(
            &self,
            backend: &Backend,
            current: Health,
            history: &[Probe],
            now_ms: u64,
        ) -> Verdict;
    }
}

/// Promotion policies: choose a new primary.
pub mod promotion {
    wit_bindgen::generate!({
        world: "promotion",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_promotion",
        default_bindings_module: "keyway_plugin_sdk::promotion",
        runtime_path: "keyway_plugin_sdk::__rt::rt",
    });

    pub use exports::keyway::policy::promotion_policy::{Candidate, Decision, Guest};
    pub use keyway::policy::types::{Backend, Health, Role};

    /// A promotion policy.
    pub trait PromotionPolicy: Sized + Send + 'static {
        /// Builds the policy from its configuration, or says what is wrong with it.
        fn configure(config: serde_json::Value) -> Result<Self, String>;
        /// Decides whether and whom to promote.
        fn decide(
            &self,
            primary: Option<&Candidate>,
            candidates: &[Candidate],
            now_ms: u64,
        ) -> Decision;
    }
}

/// Request classifiers: tell reads from writes.
pub mod classifier {
    wit_bindgen::generate!({
        world: "classifier",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_classifier",
        default_bindings_module: "keyway_plugin_sdk::classifier",
        runtime_path: "keyway_plugin_sdk::__rt::rt",
    });

    pub use exports::keyway::policy::request_classifier::{Guest, Kind};

    /// A request classifier. Called per request: keep it cheap.
    pub trait Classifier: Sized + Send + 'static {
        /// Builds the classifier from its configuration, or says what is wrong with it.
        fn configure(config: serde_json::Value) -> Result<Self, String>;
        /// Classifies a request. keyway remembers the answer for the same method, path
        /// and host (unless the cluster sets `remember_answers = false`), so the answer
        /// should depend on nothing else.
        fn classify(&self, method: &str, path: &str, host: &str) -> Kind;
    }
}

#[doc(hidden)]
pub fn __parse_config(config: &str) -> Result<serde_json::Value, String> {
    if config.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    serde_json::from_str(config).map_err(|e| format!("configuration is not JSON: {e}"))
}

/// Exports a [`health::HealthPolicy`] as the plugin's health policy.
#[macro_export]
macro_rules! health_policy {
    ($ty:ty) => {
        static __KEYWAY_POLICY: ::std::sync::Mutex<Option<$ty>> = ::std::sync::Mutex::new(None);
        struct __KeywayHealth;
        impl $crate::health::Guest for __KeywayHealth {
            fn configure(config: String) -> Result<(), String> {
                let value = $crate::__parse_config(&config)?;
                let policy = <$ty as $crate::health::HealthPolicy>::configure(value)?;
                *__KEYWAY_POLICY.lock().unwrap_or_else(|e| e.into_inner()) = Some(policy);
                Ok(())
            }
            fn evaluate(
                backend: $crate::health::Backend,
                current: $crate::health::Health,
                history: Vec<$crate::health::Probe>,
                now_ms: u64,
            ) -> $crate::health::Verdict {
                let guard = __KEYWAY_POLICY.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_ref() {
                    Some(p) => $crate::health::HealthPolicy::evaluate(p, &backend, current, &history, now_ms),
                    None => $crate::health::Verdict {
                        health: current,
                        reason: "policy not configured".into(),
                    },
                }
            }
        }
        $crate::health::__export_health!(__KeywayHealth with_types_in $crate::health);
    };
}

/// Exports a [`promotion::PromotionPolicy`] as the plugin's promotion policy.
#[macro_export]
macro_rules! promotion_policy {
    ($ty:ty) => {
        static __KEYWAY_POLICY: ::std::sync::Mutex<Option<$ty>> = ::std::sync::Mutex::new(None);
        struct __KeywayPromotion;
        impl $crate::promotion::Guest for __KeywayPromotion {
            fn configure(config: String) -> Result<(), String> {
                let value = $crate::__parse_config(&config)?;
                let policy = <$ty as $crate::promotion::PromotionPolicy>::configure(value)?;
                *__KEYWAY_POLICY.lock().unwrap_or_else(|e| e.into_inner()) = Some(policy);
                Ok(())
            }
            fn decide(
                primary: Option<$crate::promotion::Candidate>,
                candidates: Vec<$crate::promotion::Candidate>,
                now_ms: u64,
            ) -> $crate::promotion::Decision {
                let guard = __KEYWAY_POLICY.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_ref() {
                    Some(p) => $crate::promotion::PromotionPolicy::decide(p, primary.as_ref(), &candidates, now_ms),
                    None => $crate::promotion::Decision::Keep,
                }
            }
        }
        $crate::promotion::__export_promotion!(__KeywayPromotion with_types_in $crate::promotion);
    };
}

/// Exports a [`classifier::Classifier`] as the plugin's request classifier.
#[macro_export]
macro_rules! classifier {
    ($ty:ty) => {
        static __KEYWAY_POLICY: ::std::sync::Mutex<Option<$ty>> = ::std::sync::Mutex::new(None);
        struct __KeywayClassifier;
        impl $crate::classifier::Guest for __KeywayClassifier {
            fn configure(config: String) -> Result<(), String> {
                let value = $crate::__parse_config(&config)?;
                let policy = <$ty as $crate::classifier::Classifier>::configure(value)?;
                *__KEYWAY_POLICY.lock().unwrap_or_else(|e| e.into_inner()) = Some(policy);
                Ok(())
            }
            fn classify(method: String, path: String, host: String) -> $crate::classifier::Kind {
                let guard = __KEYWAY_POLICY.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_ref() {
                    Some(p) => $crate::classifier::Classifier::classify(p, &method, &path, &host),
                    // Unconfigured: the safe answer.
                    None => $crate::classifier::Kind::Write,
                }
            }
        }
        $crate::classifier::__export_classifier!(__KeywayClassifier with_types_in $crate::classifier);
    };
}
