//! Field helpers: addresses (syntax only), durations, paths, tokens, PEM files, host
//! patterns.

use super::*;

// === field helpers ===

/// A `HOST:PORT` address: an IP address, or a name the loader resolves.
pub(super) fn address(text: &str, path: &KeyPath, errs: &mut Errors<'_>) -> Option<Address> {
    match text.parse::<Address>() {
        Ok(a) => Some(a),
        Err(e) => {
            errs.push(
                path,
                e.to_string(),
                "write HOST:PORT, e.g. \"10.0.0.1:443\" or \"[::1]:8443\"",
            );
            None
        }
    }
}

pub(super) fn duration(
    text: Option<&str>,
    path: &KeyPath,
    default: Duration,
    errs: &mut Errors<'_>,
) -> Duration {
    match text.map(parse_duration) {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            errs.push(
                path,
                e,
                format!(
                    "or remove it to use the default ({})",
                    humantime::format_duration(default)
                ),
            );
            default
        }
    }
}

pub(super) fn nonzero_duration(
    text: Option<&str>,
    path: &KeyPath,
    default: Duration,
    errs: &mut Errors<'_>,
) -> Duration {
    let d = duration(text, path, default, errs);
    if d.is_zero() {
        errs.push(
            path,
            "a zero duration here would fail every request",
            format!(
                "use a positive duration, or remove it to use the default ({})",
                humantime::format_duration(default)
            ),
        );
        return default;
    }
    d
}

pub(super) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The admin token in `file`: one line of at least 16 visible ASCII characters
/// (surrounding whitespace and the final newline are ignored).
pub(super) fn admin_token(file: &Path, path: &KeyPath, errs: &mut Errors<'_>) -> Option<Arc<str>> {
    const FIX: &str = "fill it with a random token: head -c 32 /dev/urandom | base64 > FILE";
    read_file_checked(file, path, errs)?;
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            errs.push(path, format!("cannot read {}: {e}", file.display()), FIX);
            return None;
        }
    };
    let token = text.trim();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        errs.push(
            path,
            format!(
                "{} must hold one token of at least 16 visible ASCII characters",
                file.display()
            ),
            FIX,
        );
        return None;
    }
    Some(Arc::from(token))
}

/// The PEM certificates in `file` (at least one); `fix` says what to point `path` at.
pub(super) fn pem_certs(
    file: &Path,
    path: &KeyPath,
    fix: &str,
    errs: &mut Errors<'_>,
) -> Option<Vec<CertificateDer<'static>>> {
    read_file_checked(file, path, errs)?;
    match super::super::pem::certs(file) {
        Ok(c) => Some(c),
        Err(e) => {
            errs.push(path, e, fix);
            None
        }
    }
}

pub(super) fn read_file_checked(file: &Path, path: &KeyPath, errs: &mut Errors<'_>) -> Option<()> {
    match std::fs::metadata(file) {
        Ok(m) if m.is_file() => Some(()),
        Ok(_) => {
            errs.push(
                path,
                format!("{} is not a file", file.display()),
                "point it at a PEM file",
            );
            None
        }
        Err(e) => {
            errs.push(
                path,
                format!("cannot read {}: {e}", file.display()),
                "check the path (relative paths are taken from the config file's folder)",
            );
            None
        }
    }
}

pub(super) fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Parses a route or certificate host pattern.
pub(crate) fn host_pattern(text: &str) -> Result<HostPattern, ()> {
    let t = text.trim().to_ascii_lowercase();
    if t == "*" {
        return Ok(HostPattern::Any);
    }
    let (suffix, name) = match t.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, t.as_str()),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    match (valid, suffix) {
        (false, _) => Err(()),
        (true, true) => Ok(HostPattern::Suffix(format!(".{name}"))),
        (true, false) => Ok(HostPattern::Exact(name.to_string())),
    }
}

/// A value from a fixed list of names; the first is the default when the key is absent.
/// An unknown name is an error at `path` (`unknown KEY \`NAME\``, with `fix`) and
/// yields the default, so the rest of the config is still checked.
pub(super) fn one_of<T: Copy>(
    text: Option<&str>,
    choices: &[(&str, T)],
    path: &KeyPath,
    key: &str,
    fix: &str,
    errs: &mut Errors<'_>,
) -> T {
    let default = choices[0].1;
    let Some(text) = text else {
        return default;
    };
    match choices.iter().find(|(name, _)| *name == text) {
        Some((_, v)) => *v,
        None => {
            errs.push(path, format!("unknown {key} `{text}`"), fix);
            default
        }
    }
}
