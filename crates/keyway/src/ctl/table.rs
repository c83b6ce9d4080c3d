//! How `keyway ctl` shows the admin API's answers to a person: aligned tables and one
//! sentence per change. Reads the JSON only; a field it does not know is left out,
//! never an error.

use serde_json::Value;

/// Columns padded to their widest cell, two spaces apart.
fn aligned(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `Unix ms` as UTC `YYYY-MM-DD HH:MM:SS`.
fn when(ms: &Value) -> String {
    ms.as_u64()
        .map(|ms| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            humantime::format_rfc3339_seconds(t)
                .to_string()
                .replace('T', " ")
                .trim_end_matches('Z')
                .to_string()
                + " UTC"
        })
        .unwrap_or_else(|| "-".into())
}

/// A drain in one cell: `drained by X since T until D`, with who holds on.
fn drain_cell(d: &Value) -> String {
    if d.is_null() {
        return "-".into();
    }
    let until = if d["deadline_unix_ms"].is_null() {
        "sessions end".to_string()
    } else if d["expired"] == true {
        "deadline passed".to_string()
    } else {
        when(&d["deadline_unix_ms"])
    };
    format!(
        "drained by {} since {}, until {}; {} client(s), {} open",
        text(&d["by"]),
        when(&d["since_unix_ms"]),
        until,
        text(&d["holding_clients"]),
        text(&d["in_flight"]),
    )
}

/// `/status` as one table per cluster.
pub(super) fn status(s: &Value) -> String {
    let mut out = String::new();
    for c in s["clusters"].as_array().into_iter().flatten() {
        let mut head = format!("cluster {} ({}", text(&c["name"]), text(&c["strategy"]));
        if !c["primary"].is_null() || c["strategy"] == "primary-replica" {
            head.push_str(&format!(
                ", primary {}, epoch {}",
                text(&c["primary"]),
                text(&c["epoch"])
            ));
        }
        head.push(')');
        out.push_str(&head);
        out.push('\n');
        let mut rows = vec![[
            "BACKEND",
            "ADDRESS",
            "ROLE",
            "HEALTH",
            "IN-FLIGHT",
            "REQUESTS",
            "DRAIN",
        ]
        .map(String::from)
        .to_vec()];
        for b in c["backends"].as_array().into_iter().flatten() {
            rows.push(vec![
                text(&b["id"]),
                text(&b["address"]),
                text(&b["role"]),
                text(&b["health"]["health"]),
                text(&b["in_flight"]),
                text(&b["requests"]),
                drain_cell(&b["drain"]),
            ]);
        }
        for line in aligned(&rows).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    if let Some(r) = s["last_reload"].as_object() {
        if let Some(ok) = r.get("ok") {
            out.push_str(&format!(
                "last reload: {}\n",
                if ok == true { "ok" } else { "refused" }
            ));
        }
    }
    out
}

/// A drain or undrain answer.
pub(super) fn drain(d: &Value) -> String {
    let name = format!("{}/{}", text(&d["cluster"]), text(&d["backend"]));
    match (d["drained"] == true, d["changed"] == true) {
        (true, true) => format!(
            "{name} drained: no new sessions; {}",
            match d["drain"]["deadline_unix_ms"].as_u64() {
                Some(_) => format!(
                    "pinned sessions keep it until {}",
                    when(&d["drain"]["deadline_unix_ms"])
                ),
                None => "pinned sessions keep it until they end".into(),
            }
        ),
        (true, false) => format!(
            "{name} was already drained ({})",
            drain_cell(&serde_json::json!({
                "by": d["drain"]["by"],
                "since_unix_ms": d["drain"]["unix_ms"],
                "deadline_unix_ms": d["drain"]["deadline_unix_ms"],
            }))
            .split(';')
            .next()
            .unwrap_or_default()
        ),
        (false, true) => format!("{name} undrained: takes new sessions again"),
        (false, false) => format!("{name} was not drained; nothing changed"),
    }
}

/// A promote or failback answer (the new topology).
pub(super) fn topology(cluster: &str, t: &Value) -> String {
    format!(
        "{cluster}: primary {} in epoch {} ({})",
        text(&t["primary"]),
        text(&t["epoch"]),
        text(&t["reason"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string()],
            vec!["longer".to_string(), "x".to_string()],
        ];
        assert_eq!(aligned(&rows), "A       BB\nlonger  x\n");
    }
}
