//! Two nodes on loopback: site b asks site a's agent through its own node (relayed over the
//! authenticated transport); a's allow-list for b decides, a refused command never reaches
//! a's handler and moves a's counter.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tern_node::agent::{AgentError, Answer, ErrorCode, Name, Reply, Request, VmState};
use tern_node::agent_worker::{self, AgentHandler};
use tern_transport::crypto::{StaticKeypair, encode_key};

struct Site {
    calls: AtomicUsize,
}

impl AgentHandler for Site {
    fn handle(&self, req: &Request) -> Result<Answer, AgentError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match req {
            Request::VmList {} => Ok(Answer::Vms {
                vms: vec![VmState {
                    name: "vm1".into(),
                    site: "a".into(),
                    role: "primary".into(),
                    state: "running".into(),
                    pid: 7,
                    mem_mib: 256,
                    ip: None,
                }],
            }),
            Request::VmStatus { name } => Err(AgentError::new(
                ErrorCode::NotFound,
                format!("no VM {name} here"),
            )),
            _ => Ok(Answer::Done {
                message: "done".into(),
            }),
        }
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_peer_reaches_only_its_allowed_agent_commands() {
    let dir = std::env::temp_dir().join(format!("tern-agent-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let keys = [
        StaticKeypair::generate().unwrap(),
        StaticKeypair::generate().unwrap(),
    ];
    let ports = [free_udp_port(), free_udp_port()];
    let names = ["a", "b"];
    let mut configs = Vec::new();
    for i in 0..2 {
        let j = 1 - i;
        let key = dir.join(format!("{}.key", names[i]));
        std::fs::write(&key, format!("{}\n", encode_key(&keys[i].private))).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // a lets b list and ask status; b lets a nothing.
        let agent = if i == 0 {
            "agent = [\"vm.list\", \"vm.status\"]\n"
        } else {
            ""
        };
        let text = format!(
            "[node]\nname = \"site-{n}\"\nprivate_key_file = \"{k}\"\nlisten = \"127.0.0.1:{p}\"\n\
             control = \"{c}\"\n\n[[peer]]\nname = \"site-{m}\"\npublic_key = \"{pk}\"\n\
             address = \"127.0.0.1:{q}\"\n{agent}",
            n = names[i],
            k = key.display(),
            p = ports[i],
            c = dir.join(format!("{}.sock", names[i])).display(),
            m = names[j],
            pk = encode_key(&keys[j].public),
            q = ports[j],
        );
        let path = dir.join(format!("{}.toml", names[i]));
        std::fs::write(&path, &text).unwrap();
        configs.push(tern_node::NodeConfig::load(&path).unwrap());
    }
    let handler_a = Arc::new(Site {
        calls: AtomicUsize::new(0),
    });
    let handler_b = Arc::new(Site {
        calls: AtomicUsize::new(0),
    });
    let mut handlers: Vec<Arc<dyn AgentHandler>> = vec![handler_a.clone(), handler_b.clone()];
    for cfg in configs {
        let h = handlers.remove(0);
        let node = tern_node::Node::with_agent(cfg, Some(h)).unwrap();
        // The nodes run until the test process ends.
        std::thread::spawn(move || node.run());
    }
    let sock_a = dir.join("a.sock");
    let sock_b = dir.join("b.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tern_node::request_status(&sock_b)
        .map(|s| s.peers.iter().all(|p| p.connected))
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "the nodes did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Duration::from_secs(10);
    let call = |sock: &std::path::Path, site: &str, req: &Request| {
        agent_worker::call(sock, site, req, t).unwrap()
    };
    // Allowed, relayed from b to a: a's handler answers.
    let r = call(&sock_b, "site-a", &Request::VmList {});
    assert!(
        matches!(&r, Reply::Ok(Answer::Vms { vms }) if vms[0].name == "vm1"),
        "{r:?}"
    );
    let r = call(
        &sock_b,
        "site-a",
        &Request::VmStatus {
            name: Name::new("nope").unwrap(),
        },
    );
    assert!(
        matches!(&r, Reply::Error(e) if e.code == ErrorCode::NotFound),
        "{r:?}"
    );
    assert_eq!(handler_a.calls.load(Ordering::SeqCst), 2);
    // Outside b's allow-list at a: refused there, a's handler never called.
    let stop = Request::VmStop {
        name: Name::new("vm1").unwrap(),
    };
    let r = call(&sock_b, "site-a", &stop);
    let Reply::Error(e) = &r else { panic!("{r:?}") };
    assert_eq!(e.code, ErrorCode::Refused, "{r:?}");
    assert!(e.message.contains("vm.stop"), "{}", e.message);
    assert_eq!(handler_a.calls.load(Ordering::SeqCst), 2);
    let st = tern_node::request_status(&sock_a).unwrap();
    assert_eq!(st.agent.refused, 1, "{:?}", st.agent);
    assert_eq!(st.agent.from_peers, 3, "{:?}", st.agent);
    // b grants a nothing: not even an agent stream opens there.
    let r = call(&sock_a, "site-b", &Request::VmList {});
    assert!(
        matches!(&r, Reply::Error(e) if e.code == ErrorCode::Refused
            && e.message.contains("grants this site no agent commands")),
        "{r:?}"
    );
    assert_eq!(handler_b.calls.load(Ordering::SeqCst), 0);
    let st_b = tern_node::request_status(&sock_b).unwrap();
    assert!(st_b.flows.refused_by_policy >= 1, "{:?}", st_b.flows);
    // Local callers may call everything on their own node.
    let r = call(&sock_a, "", &stop);
    assert!(matches!(r, Reply::Ok(Answer::Done { .. })), "{r:?}");
    assert_eq!(handler_a.calls.load(Ordering::SeqCst), 3);
    // A relay to a peer that does not exist is answered, not hung.
    let r = call(&sock_a, "site-x", &Request::VmList {});
    assert!(
        matches!(&r, Reply::Error(e) if e.code == ErrorCode::Unavailable),
        "{r:?}"
    );
    // `status` on the same socket still works.
    assert_eq!(tern_node::request_status(&sock_a).unwrap().name, "site-a");
    let _ = std::fs::remove_dir_all(&dir);
}
