//! `pam-classifier`: the PAM REST calls a read-only server may serve. GET, HEAD and
//! OPTIONS are reads; so are these POSTs, which only retrieve secrets or launch sessions:
//! - PVWA: `/PasswordVault/api/Accounts/{id}/Password/Retrieve`,
//!   `/PasswordVault/api/Accounts/{id}/Secret/Retrieve`,
//!   `/PasswordVault/api/Accounts/{id}/PSMConnect`,
//!   `/PasswordVault/api/Accounts/{id}/AdHocConnect`;
//! - PAM360: `/restapi/json/v1/resources/{id}/accounts/{id}/password`,
//!   `/api/pki/restapi/getPassword`, `/restapi/json/v1/sessions/launch`.
//!
//! Everything else is a write. Config: `{ "extra_reads": ["POST /custom/*/read"] }`
//! adds patterns (`*` = one path segment).
use keyway_plugin_sdk::classifier::*;

const BUILT_IN: &[&str] = &[
    "POST /PasswordVault/api/Accounts/*/Password/Retrieve",
    "POST /PasswordVault/api/Accounts/*/Secret/Retrieve",
    "POST /PasswordVault/api/Accounts/*/PSMConnect",
    "POST /PasswordVault/api/Accounts/*/AdHocConnect",
    "POST /restapi/json/v1/resources/*/accounts/*/password",
    "POST /api/pki/restapi/getPassword",
    "POST /restapi/json/v1/sessions/launch",
];

struct Pattern {
    method: String,
    segments: Vec<String>,
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        let (method, path) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("`{text}`: write METHOD and path, e.g. \"POST /a/*/b\""))?;
        if !path.starts_with('/') {
            return Err(format!("`{text}`: the path must start with `/`"));
        }
        Ok(Pattern {
            method: method.to_ascii_uppercase(),
            segments: path
                .trim_start_matches('/')
                .split('/')
                .map(str::to_string)
                .collect(),
        })
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        if !self.method.eq_ignore_ascii_case(method) {
            return false;
        }
        let mut parts = path.trim_start_matches('/').split('/');
        for seg in &self.segments {
            match parts.next() {
                Some(p) if seg == "*" || p.eq_ignore_ascii_case(seg) => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

struct Pam {
    reads: Vec<Pattern>,
}

impl Classifier for Pam {
    fn configure(config: serde_json::Value) -> Result<Self, String> {
        let mut reads: Vec<Pattern> = BUILT_IN
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<_, _>>()?;
        if let Some(extra) = config.get("extra_reads") {
            let list = extra
                .as_array()
                .ok_or("`extra_reads` must be a list of strings")?;
            for v in list {
                reads.push(Pattern::parse(
                    v.as_str().ok_or("`extra_reads` must hold strings")?,
                )?);
            }
        }
        Ok(Pam { reads })
    }

    fn classify(&self, method: &str, path: &str, _host: &str) -> Kind {
        if matches!(method, "GET" | "HEAD" | "OPTIONS")
            || self.reads.iter().any(|p| p.matches(method, path))
        {
            Kind::Read
        } else {
            Kind::Write
        }
    }
}

keyway_plugin_sdk::classifier!(Pam);
