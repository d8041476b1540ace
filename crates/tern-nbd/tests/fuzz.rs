//! Deterministic randomized robustness test of the session (the CI twin of
//! `fuzz/fuzz_targets/session.rs`): thousands of seeded random, structured and mutated byte
//! streams, fed in random chunks, with requests answered correctly, wrongly, late or out of
//! order. The session must not panic, must only hand out validated requests, and its
//! output must stay bounded. A failure prints its seed; `TERN_NBD_FUZZ_CASES` runs more.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use common::*;
use tern_nbd::proto::MAX_PAYLOAD_BYTES;
use tern_nbd::wire::*;
use tern_nbd::{
    Command, Event, Extent, MemBackend, NbdError, Reply, Request, ServerSession, execute,
};

const BASE_SEED: u64 = 0x7e4d_0000;
const DEFAULT_CASES: u64 = 4000;
const EXPORT_BYTES: u64 = 64 * 1024;

fn exports() -> Vec<tern_nbd::ExportInfo> {
    vec![
        export("disk", EXPORT_BYTES, false),
        export("ro", EXPORT_BYTES, true),
        export("", 512, false),
    ]
}

/// Something close to a valid option, sometimes broken.
fn random_option(rng: &mut Rng) -> Vec<u8> {
    let names = ["disk", "ro", "", "nope"];
    let name = names[rng.below(4) as usize];
    match rng.below(12) {
        0 => option(OPT_LIST, &[]),
        1 => option(OPT_STRUCTURED_REPLY, &[]),
        2 => option(
            OPT_SET_META_CONTEXT,
            &meta_data(
                name,
                &["base:allocation", "base:", "x:y"][..rng.below(4) as usize],
            ),
        ),
        3 => option(
            OPT_LIST_META_CONTEXT,
            &meta_data(name, &["base:"][..rng.below(2) as usize]),
        ),
        4 => option(
            OPT_INFO,
            &info_data(
                name,
                &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77][..rng.below(5) as usize],
            ),
        ),
        5 => option(
            OPT_GO,
            &info_data(name, &[INFO_BLOCK_SIZE][..rng.below(2) as usize]),
        ),
        6 => option(OPT_EXPORT_NAME, name.as_bytes()),
        7 => option(OPT_STARTTLS, &[]),
        8 => option(rng.below(20) as u32, &rng.bytes_below(64)),
        9 => {
            // A length that disagrees with the data that follows.
            let mut v = option(rng.below(12) as u32, &rng.bytes_below(32));
            v[12..16].copy_from_slice(&(rng.next() as u32 % 100_000).to_be_bytes());
            v
        }
        10 => option(OPT_ABORT, &[]),
        _ => rng.bytes_below(40),
    }
}

/// Something close to a valid request, sometimes broken.
fn random_request(rng: &mut Rng) -> Vec<u8> {
    let kind = match rng.below(40) {
        0..=35 => [
            CMD_READ,
            CMD_WRITE,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_WRITE_ZEROES,
            CMD_BLOCK_STATUS,
        ][rng.below(6) as usize],
        36..=38 => rng.below(16) as u16,
        _ => CMD_DISC,
    };
    let flags = match rng.below(8) {
        0 => rng.next() as u16,
        1..=3 => [
            CMD_FLAG_FUA,
            CMD_FLAG_NO_HOLE,
            CMD_FLAG_DF,
            CMD_FLAG_REQ_ONE,
        ][rng.below(4) as usize],
        _ => 0,
    };
    let offset = match rng.below(8) {
        0 => rng.next(),
        1 => EXPORT_BYTES - rng.below(600),
        _ => rng.below(EXPORT_BYTES - 5000),
    };
    let len = match rng.below(20) {
        0 | 1 => rng.next() as u32,
        2 => MAX_PAYLOAD_BYTES + rng.below(3) as u32,
        _ => rng.below(5000) as u32,
    };
    let cookie = rng.below(8);
    if kind == CMD_WRITE && len <= 8192 {
        let data = rng.bytes(len as usize);
        write_request(flags, cookie, offset, &data)
    } else {
        request(flags, kind, cookie, offset, len)
    }
}

fn stream(rng: &mut Rng) -> Vec<u8> {
    let mut bytes = Vec::new();
    match rng.below(4) {
        0 => bytes = rng.bytes_below(2000),
        1 => {
            bytes.extend((rng.below(4) as u32).to_be_bytes());
            for _ in 0..rng.below(20) {
                bytes.extend(random_option(rng));
            }
        }
        _ => {
            bytes.extend((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
            if rng.below(3) > 0 {
                bytes.extend(option(OPT_STRUCTURED_REPLY, &[]));
                bytes.extend(option(
                    OPT_SET_META_CONTEXT,
                    &meta_data("disk", &["base:allocation"]),
                ));
            }
            bytes.extend(option(
                OPT_GO,
                &info_data(["disk", "ro", ""][rng.below(3) as usize], &[]),
            ));
            for _ in 0..rng.below(80) {
                bytes.extend(random_request(rng));
            }
        }
    }
    // Mutate a few bytes.
    if !bytes.is_empty() && rng.below(2) == 0 {
        for _ in 0..=rng.below(4) {
            let i = rng.below(bytes.len() as u64) as usize;
            bytes[i] ^= 1 << rng.below(8);
        }
    }
    if rng.below(8) == 0 {
        bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize);
    }
    bytes
}

/// An answer: usually right, sometimes an error or a wrong kind of reply.
fn answer(rng: &mut Rng, backend: &MemBackend, request: &Request) -> Result<Reply, NbdError> {
    match rng.below(10) {
        0 => Err(NbdError::Io),
        1 => Ok(Reply::Data(rng.bytes_below(10))),
        2 => Ok(Reply::Extents(
            (0..rng.below(4))
                .map(|_| Extent {
                    len: rng.below(1 << 20),
                    hole: rng.below(2) == 0,
                    zero: rng.below(2) == 0,
                })
                .collect(),
        )),
        3 => Ok(Reply::Done),
        _ => execute(backend, request).map_err(|e| tern_nbd::nbd_error(&e)),
    }
}

fn check_request(request: &Request, export: &tern_nbd::ExportInfo, seed: u64) {
    let end = request.offset.checked_add(u64::from(request.len));
    if request.command != Command::Flush {
        assert!(
            request.len > 0 && end.is_some_and(|end| end <= export.size),
            "seed {seed}: {request:?}"
        );
    }
    let writes = matches!(
        request.command,
        Command::Write(_) | Command::Trim | Command::WriteZeroes { .. }
    );
    assert!(
        !(writes && export.read_only),
        "seed {seed}: write to read-only export"
    );
    if let Command::Write(data) = &request.command {
        assert_eq!(data.len(), request.len as usize, "seed {seed}");
    }
    assert!(
        request.len <= MAX_PAYLOAD_BYTES
            || !matches!(request.command, Command::Read | Command::Write(_))
    );
}

/// What one case reached, summed over all cases to show the generator covers the session.
#[derive(Debug, Default)]
struct Reached {
    exports_chosen: u64,
    requests: u64,
    closes: std::collections::BTreeMap<String, u64>,
}

fn run_case(seed: u64, reached: &mut Reached) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let bytes = stream(&mut rng);
    let exports = exports();
    let mut session = ServerSession::new(exports.clone());
    let backend = MemBackend::new(EXPORT_BYTES as usize, false);
    let mut output = session.take_output().len();
    let mut data_replied = 0;
    let mut chosen = None;
    let mut closes = 0;
    let mut parked: Vec<Request> = Vec::new();
    let mut rest = &bytes[..];
    loop {
        let n = (1 + rng.below(600) as usize).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        if chunk.is_empty() {
            session.input_eof();
        } else {
            session.input(chunk);
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::ExportChosen(index) => {
                    assert!(chosen.is_none() && index < exports.len(), "seed {seed}");
                    reached.exports_chosen += 1;
                    chosen = Some(index);
                }
                Event::Request(request) => {
                    let export = chosen
                        .map(|i| &exports[i])
                        .unwrap_or_else(|| panic!("seed {seed}: request before export"));
                    check_request(&request, export, seed);
                    reached.requests += 1;
                    if rng.below(4) == 0 {
                        parked.push(request);
                        continue;
                    }
                    let reply = answer(&mut rng, &backend, &request);
                    if let Ok(Reply::Data(d)) = &reply {
                        data_replied += d.len();
                    }
                    let _ = session.reply(request.id, reply);
                }
                Event::Close(reason) => {
                    closes += 1;
                    let name = format!("{reason:?}");
                    let name = name
                        .split(['(', ' ', '{'])
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ");
                    *reached.closes.entry(name).or_default() += 1;
                }
            }
            // Answer parked requests late and out of order.
            if !parked.is_empty() && rng.below(3) == 0 {
                let request = parked.swap_remove(rng.below(parked.len() as u64) as usize);
                let reply = answer(&mut rng, &backend, &request);
                if let Ok(Reply::Data(d)) = &reply {
                    data_replied += d.len();
                }
                let _ = session.reply(request.id, reply);
            }
        }
        output += session.take_output().len();
        if chunk.is_empty() {
            break;
        }
    }
    for request in parked {
        let _ = session.reply(request.id, Err(NbdError::Io));
    }
    while let Some(event) = session.poll_event() {
        assert!(
            matches!(event, Event::Close(_)),
            "seed {seed}: {event:?} after end of input"
        );
        closes += 1;
    }
    output += session.take_output().len();
    assert_eq!(closes, 1, "seed {seed}: exactly one close");
    assert!(session.is_closed(), "seed {seed}");
    let bound = 1024 + 64 * bytes.len() + data_replied;
    assert!(
        output <= bound,
        "seed {seed}: {output} output bytes for {} input bytes",
        bytes.len()
    );
}

#[test]
fn random_streams_never_panic_and_output_stays_bounded() {
    let cases = std::env::var("TERN_NBD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut reached = Reached::default();
    for i in 0..cases {
        let seed = BASE_SEED + i;
        if catch_unwind(AssertUnwindSafe(|| run_case(seed, &mut reached))).is_err() {
            panic!("failing seed: {seed}");
        }
    }
    println!("{reached:#?}");
    assert!(
        reached.exports_chosen > cases / 4 && reached.requests > cases,
        "{reached:?}"
    );
    assert!(
        reached.closes.len() >= 6,
        "close reasons reached: {:?}",
        reached.closes
    );
}
