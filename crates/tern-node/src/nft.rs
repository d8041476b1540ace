//! Transparent interception: an nftables table per node that REDIRECTs TCP to the accelerated
//! subnets (locally generated and forwarded) to the node's listener; the node's own outbound
//! connections carry `sys::NODE_MARK` and are skipped.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::NodeError;
use crate::config::Accelerate;
use crate::sys::NODE_MARK;

pub fn table_name(node: &str) -> String {
    let clean: String = node
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("tern_{clean}")
}

pub fn ruleset(table: &str, rules: &[Accelerate], port: u16, bypass: Option<(u16, u16)>) -> String {
    let nets: Vec<String> = rules.iter().map(|a| a.subnet.to_string()).collect();
    let set = nets.join(", ");
    let ports = match bypass {
        Some((a, b)) => format!("!= {{ 0, {a}-{b} }}"),
        None => "!= 0".to_string(),
    };
    format!(
        "table ip {table} {{\n\
         \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\
         \t\tmeta mark {NODE_MARK:#x} return\n\
         \t\tip daddr {{ {set} }} tcp dport {ports} redirect to :{port}\n\t}}\n\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority -100; policy accept;\n\
         \t\tip daddr {{ {set} }} tcp dport {ports} redirect to :{port}\n\t}}\n}}\n"
    )
}

fn nft(input: &str) -> Result<(), NodeError> {
    let mut child = Command::new("nft")
        .arg("-f")
        .arg("-")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NodeError::Io {
            what: "run nft (is nftables installed?)".into(),
            source,
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|source| NodeError::Io {
            what: "write nft rules".into(),
            source,
        })?;
    let out = child.wait_with_output().map_err(|source| NodeError::Io {
        what: "wait for nft".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(NodeError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Installs (replacing any stale copy) the interception table; returns its name.
pub fn install(
    node: &str,
    rules: &[Accelerate],
    port: u16,
    bypass: Option<(u16, u16)>,
) -> Result<String, NodeError> {
    let table = table_name(node);
    let _ = nft(&format!("delete table ip {table}\n"));
    nft(&ruleset(&table, rules, port, bypass))?;
    Ok(table)
}

pub fn remove(table: &str) {
    let _ = nft(&format!("delete table ip {table}\n"));
}
