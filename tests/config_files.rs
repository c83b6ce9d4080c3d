//! Config loading: every example in `config/` is valid, and a broken config reports all
//! of its errors at once with lines and fixes.

use keyway_tests::*;

#[test]
fn every_example_config_loads() {
    let dir = repo_config_dir();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("config dir") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        keyway::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        n += 1;
    }
    assert!(n >= 2, "expected example configs in {}", dir.display());
}

const BROKEN: &str = r#"[[listener]]
listen = "0.0.0.0"

[[listener]]
listen = "127.0.0.1:8443"
tls = [{ hosts = ["pvwa.corp.test"], cert = "missing.pem", key = "missing.key" }]

[[route]]
host = "pvwa.corp.test"
cluster = "vaults"

[cluster.vault]
strategy = "fastest"
connect_stagger = "soon"
backends = [
  { id = "a", address = "10.0.0.1:443" },
  { id = "a", adress = "10.0.0.2:443", address = "10.0.0.2:443" },
]
"#;

#[test]
fn all_errors_are_reported_at_once_with_lines_and_fixes() {
    let err = keyway::Config::from_str_with_base(BROKEN, "broken.toml", &temp_dir()).unwrap_err();
    let text = err.to_string();
    let find = |needle: &str| {
        err.errors
            .iter()
            .find(|e| e.message.contains(needle))
            .unwrap_or_else(|| panic!("no error mentioning {needle:?} in:\n{text}"))
    };
    let bad_addr = find("`0.0.0.0` is not an address");
    assert_eq!(bad_addr.line, Some(2));
    assert!(bad_addr.fix.contains("HOST:PORT"));
    let missing = find("missing.pem");
    assert_eq!(missing.line, Some(6));
    assert_eq!(find("missing.key").line, Some(6));
    let route = find("cluster `vaults`");
    assert_eq!(route.line, Some(10));
    assert!(route.fix.contains("vault"), "{}", route.fix);
    assert_eq!(find("unknown strategy").line, Some(13));
    assert_eq!(find("`soon` is not a duration").line, Some(14));
    let dup = find("used twice");
    assert_eq!(dup.line, Some(17));
    let unknown = find("unknown key `adress`");
    assert_eq!(unknown.line, Some(17));
    assert!(unknown.fix.contains("did you mean `address`"));
    assert_eq!(err.errors.len(), 8, "{text}");
    assert!(text.contains("broken.toml:13:"), "{text}");
}

#[test]
fn syntax_and_type_errors_name_the_line() {
    let err =
        keyway::Config::from_str_with_base("[[listener]]\nlisten = \n", "s.toml", &temp_dir())
            .unwrap_err();
    assert_eq!(err.errors[0].line, Some(2), "{err}");
    let err = keyway::Config::from_str_with_base(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.a]\nretries = \"many\"\nbackends = []\n",
        "t.toml",
        &temp_dir(),
    )
    .unwrap_err();
    assert_eq!(err.errors.last().unwrap().line, Some(4), "{err}");
}
