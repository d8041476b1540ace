//! Writes the seed corpora, `fuzz/corpus/TARGET/seed-N`: a few small valid inputs per target,
//! made by the crates' own encoders. Run from the repository root or `fuzz/`:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`. Idempotent.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use tern_codec::{Encoder, MemStore, Options, Summary, wire as cwire};
use tern_disk::secondary::Op;
use tern_disk::wal::{self, Record};
use tern_disk::wire::{Compression, Msg};
use tern_node::open::{OpenHeader, encode_migration_request};
use tern_transport::crypto::StaticKeypair;
use tern_transport::record::{Codec, RecordEncoder};
use tern_transport::wire::{Frame, PnRange};
use tern_transport::{Config, Endpoint, PeerConfig};

fn corpus_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.join("corpus")
}

fn write(target: &str, seeds: &[Vec<u8>]) {
    let dir = corpus_dir().join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).expect("write seed");
    }
    println!("{target}: {} seeds", seeds.len());
}

/// A tiny QEMU 7.2 precopy stream: header, a RAM section with a few pages, EOS.
fn qemu_stream() -> Vec<u8> {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/tern-codec/tests/golden/idle.qemu.zst");
    let bytes = std::fs::read(&golden).expect("golden stream");
    let mut full = zstd::stream::decode_all(&bytes[..]).expect("golden decodes");
    full.truncate(24 << 10);
    full
}

fn codec_seeds() {
    let qemu = qemu_stream();
    let mut dec = Vec::new();
    let mut rt = Vec::new();
    for opts in [
        Options::NONE,
        Options::ALL,
        Options::parse("re+delta").unwrap(),
        Options::parse("zstd").unwrap(),
    ] {
        let mut e = Encoder::with_capacity(opts, 64, 64);
        let mut enc = vec![opts.to_byte()];
        let mut store = MemStore::default();
        e.push(&qemu, &mut enc, &mut store);
        e.finish(&mut enc);
        dec.push(enc);
        let mut r = vec![opts.to_byte(), 13];
        r.extend_from_slice(&qemu[..qemu.len().min(12 << 10)]);
        rt.push(r);
    }
    write("codec_decode", &dec);
    write("codec_roundtrip", &rt);
    let mut rev = vec![9u8];
    cwire::put_reverse(&mut rev, cwire::REV_RETURN, b"return path");
    let mut s = Vec::new();
    Summary::default().encode(&mut s);
    cwire::put_reverse(&mut rev, cwire::REV_SUMMARY, &s);
    let mut d = Vec::new();
    cwire::put_varint(&mut d, 123_456);
    cwire::put_reverse(&mut rev, cwire::REV_DELIVERED, &d);
    let mut sum = vec![0u8];
    sum.extend_from_slice(&[3, 5, 1, 200, 1]);
    write("codec_reverse", &[rev, sum]);
}

fn nbd_seeds() {
    let mut s = vec![31u8];
    s.extend_from_slice(&3u32.to_be_bytes()); // client flags: fixed newstyle, no zeroes
    s.extend_from_slice(b"IHAVEOPT");
    s.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    s.extend_from_slice(&10u32.to_be_bytes());
    s.extend_from_slice(&4u32.to_be_bytes());
    s.extend_from_slice(b"disk");
    s.extend_from_slice(&0u16.to_be_bytes());
    for (ty, off, len) in [(1u16, 0u64, 512u32), (0, 0, 512), (3, 0, 0), (2, 0, 0)] {
        s.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        s.extend_from_slice(&0u16.to_be_bytes());
        s.extend_from_slice(&ty.to_be_bytes());
        s.extend_from_slice(&7u64.to_be_bytes());
        s.extend_from_slice(&off.to_be_bytes());
        s.extend_from_slice(&len.to_be_bytes());
        if ty == 1 {
            s.extend_from_slice(&[0xab; 512]);
        }
    }
    write("nbd_session", &[s]);
}

fn frames() -> Vec<u8> {
    let mut p = Vec::new();
    for f in [
        Frame::Ping,
        Frame::Stream {
            id: 0,
            offset: 0,
            fin: false,
            data: b"hello",
        },
        Frame::Ack {
            ack_delay_us: 100,
            recovered_total: 0,
            ranges: vec![PnRange { start: 1, end: 3 }],
        },
        Frame::MaxData { max: 1 << 20 },
        Frame::MaxStreamData {
            id: 0,
            max: 1 << 16,
        },
        Frame::ResetStream {
            id: 4,
            code: 1,
            final_size: 0,
        },
        Frame::StreamEnd {
            id: 0,
            offset: 5,
            offset_len: 1,
            fin: true,
            data: b"bye",
        },
    ] {
        f.encode(&mut p);
    }
    p
}

fn transport_seeds() {
    let a_id = StaticKeypair::from_seed(1);
    let b_pub = StaticKeypair::from_seed(2).public;
    let mut a = Endpoint::new(
        a_id,
        vec![PeerConfig {
            name: "b".into(),
            public: b_pub,
            addr: Some(SocketAddr::from(([198, 18, 0, 2], 7000))),
        }],
        Config::default(),
        9,
        true,
        3_000_000_000,
    );
    a.handle_timeout(0);
    let mut init = Vec::new();
    a.poll_transmit(0, &mut init);
    let mut ep = vec![0u8, 0];
    ep.extend_from_slice(&(init.len() as u16).to_le_bytes());
    ep.extend_from_slice(&init);
    let mut ep2 = vec![1u8, 4, 40, 0];
    ep2.push(0x80);
    ep2.extend_from_slice(&[0x55; 39]);
    write("transport_endpoint", &[ep, ep2]);
    let f = frames();
    let mut pk = Vec::new();
    for chunk in f.chunks(200) {
        pk.push(chunk.len() as u8);
        pk.extend_from_slice(chunk);
    }
    write("transport_packet", &[pk]);
    write("transport_frames", &[f]);
    let text: Vec<u8> = b"tern record layer seed, compressible compressible compressible "
        .iter()
        .cycle()
        .take(3000)
        .copied()
        .collect();
    let mut recs = Vec::new();
    for (m, codec) in [
        (0u8, Codec::Raw),
        (1, Codec::Lz4),
        (6, Codec::Zstd { level: 1 }),
    ] {
        let mut e = RecordEncoder::new(codec);
        e.set_compress_all(true);
        let mut out = vec![m | 40 << 2];
        e.encode(&text, &mut out);
        recs.push(out);
    }
    write("transport_record", &recs);
}

fn agent_seeds() {
    use tern_node::agent::{
        AgentError, Answer, ErrorCode, Incoming, Name, Reply, Request, VmStartSpec,
        encode_reply, encode_request,
    };
    let name = Name::new("vm1").unwrap();
    let mut spec = VmStartSpec::new(name.clone(), 256);
    spec.ip = Some("198.18.100.20/24".into());
    spec.volume = Some(Name::new("vm1").unwrap());
    let seeds = vec![
        encode_request("", &Request::VmList {}),
        encode_request("site-b", &Request::VmStatus { name: name.clone() }),
        encode_request("", &Request::VmStart { spec: spec.clone() }),
        encode_request(
            "",
            &Request::VmStartIncoming {
                spec,
                incoming: Incoming::Tcp(49152),
            },
        ),
        encode_request("", &Request::DiskPromote { name }),
        encode_reply(&Reply::Error(AgentError::new(ErrorCode::Refused, "no"))),
        encode_reply(&Reply::Ok(Answer::Done {
            message: "ok".into(),
        })),
    ];
    write("node_agent", &seeds);
}

fn node_seeds() {
    let mut seeds = Vec::new();
    for h in [
        OpenHeader::Tcp(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 5201)),
        OpenHeader::Unix {
            path: "vm1/migrate.sock".into(),
            codec: 0,
        },
        OpenHeader::Unix {
            path: "vm1/migrate.sock".into(),
            codec: 15,
        },
        OpenHeader::Overlay,
    ] {
        let mut b = Vec::new();
        h.encode(&mut b);
        seeds.push(b);
    }
    seeds.push(encode_migration_request("site-b", "vm1/incoming.sock", 15));
    write("node_open", &seeds);
    agent_seeds();
    let mut eth = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    eth.extend_from_slice(&[0x45; 46]);
    let mut tagged = eth.clone();
    tern_gate::append_clock(&mut tagged, &[([0x02, 0, 0, 0, 0, 1], 42)]);
    let mut bcast = eth.clone();
    bcast[..6].fill(0xff);
    let mut sw = vec![40u8];
    for f in [&eth, &tagged, &bcast] {
        tern_node::switch::encode_frame(f, &mut sw);
    }
    write("node_switch", &[sw]);
    write("gate_clock", &[tagged, eth]);
}

fn disk_seeds() {
    let msgs = [
        Msg::Hello {
            version: 1,
            size: 1 << 30,
            block_shift: 12,
            name: "vm1-disk".into(),
            epoch: 0,
        },
        Msg::Data {
            seq: 1,
            offset: 4096,
            raw_len: 16,
            compression: Compression::None,
            bytes: vec![7; 16],
        },
        Msg::Zero {
            seq: 2,
            offset: 0,
            len: 8192,
        },
        Msg::Flush { seq: 3 },
        Msg::Clock {
            write: 9,
            deps: vec![([2, 0, 0, 0, 0, 2], 4)],
        },
        Msg::Ack { seq: 3 },
        Msg::Error("no".into()),
    ];
    let mut seeds = Vec::new();
    let mut stream = vec![0u8, 9];
    for m in &msgs {
        let b = m.to_bytes();
        let mut one = vec![b[0], 0];
        one.extend_from_slice(&b[5..]);
        seeds.push(one);
        stream.extend_from_slice(&b);
    }
    seeds.push(stream);
    write("disk_wire", &seeds);
    let mut log = wal::header(5).to_vec();
    for r in [
        Record {
            seq: 1,
            write: 6,
            deps: vec![],
            op: Op::Write {
                offset: 0,
                data: vec![1; 64],
            },
        },
        Record {
            seq: 2,
            write: 7,
            deps: vec![([2, 0, 0, 0, 0, 2], 3)],
            op: Op::Zero {
                offset: 4096,
                len: 4096,
            },
        },
    ] {
        let at = log.len() as u64;
        wal::encode(&r, at, at, &mut log);
    }
    write("disk_wal", &[log]);
}

fn qmp_seeds() {
    let s = [
        &b"\x20"[..],
        br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#,
        b"\r\n",
        br#"{"return": {}, "id": 0}"#,
        b"\n",
        br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
        b"\n",
        br#"{"return": {"status": "running", "running": true}, "id": 1}"#,
        b"\n",
        br#"{"error": {"class": "GenericError", "desc": "no"}, "id": 2}"#,
        b"\n",
    ]
    .concat();
    write("vm_qmp", &[s]);
}

fn main() {
    codec_seeds();
    nbd_seeds();
    transport_seeds();
    node_seeds();
    disk_seeds();
    qmp_seeds();
}
