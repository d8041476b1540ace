//! The sans-IO session, byte-exact: negotiation, every command, bounds, read-only.

mod common;

use common::*;
use tern_nbd::proto::{MAX_IN_FLIGHT, MAX_OPTION_BYTES, MAX_PAYLOAD_BYTES};
use tern_nbd::wire::*;
use tern_nbd::{
    CloseReason, Command, Event, Extent, NbdError, ProtocolError, Reply, ReplyError, RequestId,
};

const EINVAL: u32 = 22;
const EPERM: u32 = 1;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const EIO: u32 = 5;

/// Flags of a writable export before/after structured replies.
const RW_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

fn block_size_info() -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [1u32, 4096, 32 << 20] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

fn export_info(size: u64, flags: u16) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let mut session = tern_nbd::ServerSession::new(vec![]);
    assert_eq!(
        session.take_output(),
        b"NBDMAGICIHAVEOPT\x00\x03".to_vec(),
        "NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES"
    );
}

#[test]
fn export_name_is_byte_exact_with_and_without_zeroes() {
    for (client_flags, zeroes) in [
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
        (FLAG_C_FIXED_NEWSTYLE, 124),
    ] {
        let mut h = Harness::new(vec![export("disk", 0x1234_5678, false)]);
        h.feed(&client_flags.to_be_bytes());
        let out = h.feed(&option(OPT_EXPORT_NAME, b"disk"));
        let mut expected = 0x1234_5678u64.to_be_bytes().to_vec();
        expected.extend_from_slice(&RW_FLAGS.to_be_bytes());
        expected.extend_from_slice(&vec![0; zeroes]);
        assert_eq!(out, expected);
        assert_eq!(h.events, vec![Event::ExportChosen(0)]);
        assert_eq!(h.session.export(), Some(0));
    }
}

#[test]
fn go_is_byte_exact() {
    let mut h = Harness::negotiating();
    let out = h.feed(&option(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE])));
    let mut expected = opt_reply(OPT_GO, REP_INFO, &export_info(SIZE, RW_FLAGS));
    expected.extend(opt_reply(OPT_GO, REP_INFO, &block_size_info()));
    expected.extend(opt_reply(OPT_GO, REP_ACK, &[]));
    assert_eq!(out, expected);
    assert_eq!(h.events, vec![Event::ExportChosen(0)]);
}

#[test]
fn info_answers_name_and_description_and_stays_in_negotiation() {
    let mut h = Harness::negotiating();
    let out = h.feed(&option(
        OPT_INFO,
        &info_data("ro", &[INFO_NAME, INFO_DESCRIPTION, 999]),
    ));
    let replies = parse_opt_replies(&out);
    let ro_flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_READ_ONLY;
    assert_eq!(
        replies[0],
        (OPT_INFO, REP_INFO, export_info(SIZE, ro_flags))
    );
    let mut name = INFO_NAME.to_be_bytes().to_vec();
    name.extend_from_slice(b"ro");
    let mut description = INFO_DESCRIPTION.to_be_bytes().to_vec();
    description.extend_from_slice(b"ro disk");
    assert!(replies.contains(&(OPT_INFO, REP_INFO, name)));
    assert!(replies.contains(&(OPT_INFO, REP_INFO, description)));
    assert_eq!(replies.last(), Some(&(OPT_INFO, REP_ACK, vec![])));
    assert!(h.events.is_empty());
    // Still negotiating: a GO works afterwards, and the empty name means the first export.
    h.feed(&option(OPT_GO, &info_data("", &[])));
    assert_eq!(h.events, vec![Event::ExportChosen(0)]);
}

#[test]
fn option_errors_keep_negotiation_alive() {
    let mut h = Harness::negotiating();
    let cases: Vec<(Vec<u8>, u32, u32)> = vec![
        (
            option(OPT_GO, &info_data("nope", &[])),
            OPT_GO,
            REP_ERR_UNKNOWN,
        ),
        (
            option(OPT_GO, b"\x00\x00\x00\x09disk"),
            OPT_GO,
            REP_ERR_INVALID,
        ),
        (
            option(OPT_INFO, &[0, 0, 0, 0, 0, 1]),
            OPT_INFO,
            REP_ERR_INVALID,
        ),
        (option(OPT_LIST, b"x"), OPT_LIST, REP_ERR_INVALID),
        (option(OPT_STARTTLS, &[]), OPT_STARTTLS, REP_ERR_POLICY),
        (option(4, &[]), 4, REP_ERR_UNSUP),
        (option(0xdead_beef, b"whatever"), 0xdead_beef, REP_ERR_UNSUP),
        (
            option(OPT_STRUCTURED_REPLY, b"x"),
            OPT_STRUCTURED_REPLY,
            REP_ERR_INVALID,
        ),
        (
            option(
                OPT_SET_META_CONTEXT,
                &meta_data("disk", &["base:allocation"]),
            ),
            OPT_SET_META_CONTEXT,
            REP_ERR_INVALID,
        ),
        (
            option(OPT_LIST_META_CONTEXT, &meta_data("nope", &[])),
            OPT_LIST_META_CONTEXT,
            REP_ERR_UNKNOWN,
        ),
        (
            option(
                OPT_LIST_META_CONTEXT,
                b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x10ab",
            ),
            OPT_LIST_META_CONTEXT,
            REP_ERR_INVALID,
        ),
    ];
    for (bytes, opt, kind) in cases {
        let replies = parse_opt_replies(&h.feed(&bytes));
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(
            (replies[0].0, replies[0].1),
            (opt, kind),
            "{:?}",
            String::from_utf8_lossy(&replies[0].2)
        );
    }
    assert!(h.events.is_empty());
    h.feed(&option(OPT_GO, &info_data("disk", &[])));
    assert_eq!(h.events, vec![Event::ExportChosen(0)]);
}

#[test]
fn list_names_every_export() {
    let mut h = Harness::negotiating();
    let replies = parse_opt_replies(&h.feed(&option(OPT_LIST, &[])));
    let server = |name: &str| {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(format!("{name} disk").as_bytes());
        (OPT_LIST, REP_SERVER, v)
    };
    assert_eq!(
        replies,
        vec![server("disk"), server("ro"), (OPT_LIST, REP_ACK, vec![])]
    );
}

#[test]
fn abort_acks_and_closes() {
    let mut h = Harness::negotiating();
    let out = h.feed(&option(OPT_ABORT, b"ignored"));
    assert_eq!(out, opt_reply(OPT_ABORT, REP_ACK, &[]));
    assert_eq!(h.events, vec![Event::Close(CloseReason::Abort)]);
    assert!(h.session.is_closed());
    assert!(
        h.feed(&option(OPT_LIST, &[])).is_empty(),
        "input after close is ignored"
    );
}

#[test]
fn negotiation_violations_close() {
    let mut h = Harness::new(vec![export("disk", SIZE, false)]);
    h.feed(&4u32.to_be_bytes());
    assert_eq!(
        h.events,
        vec![Event::Close(CloseReason::Violation(
            ProtocolError::UnknownClientFlags(4)
        ))]
    );

    let mut h = Harness::negotiating();
    let mut bytes = option(OPT_LIST, &[]);
    bytes[0] ^= 1;
    h.feed(&bytes);
    assert!(matches!(
        h.events[..],
        [Event::Close(CloseReason::Violation(
            ProtocolError::BadOptionMagic(_)
        ))]
    ));

    let mut h = Harness::negotiating();
    let mut header = option(OPT_GO, &[]);
    header[12..16].copy_from_slice(&(MAX_OPTION_BYTES + 1).to_be_bytes());
    let replies = parse_opt_replies(&h.feed(&header));
    assert_eq!((replies[0].0, replies[0].1), (OPT_GO, REP_ERR_TOO_BIG));
    assert!(matches!(
        h.events[..],
        [Event::Close(CloseReason::Violation(
            ProtocolError::OptionTooLong { option: OPT_GO, .. }
        ))]
    ));

    let mut h = Harness::negotiating();
    assert!(h.feed(&option(OPT_EXPORT_NAME, b"nope")).is_empty());
    assert_eq!(
        h.events,
        vec![Event::Close(CloseReason::Violation(
            ProtocolError::UnknownExport("nope".into())
        ))]
    );
}

#[test]
fn meta_contexts() {
    let mut h = Harness::negotiating();
    let list = h.feed(&option(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])));
    let mut context = 0u32.to_be_bytes().to_vec();
    context.extend_from_slice(b"base:allocation");
    assert_eq!(
        parse_opt_replies(&list),
        vec![
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT, context.clone()),
            (OPT_LIST_META_CONTEXT, REP_ACK, vec![])
        ]
    );
    let list = h.feed(&option(
        OPT_LIST_META_CONTEXT,
        &meta_data("disk", &["qemu:dirty-bitmap:x", "base:"]),
    ));
    assert_eq!(
        parse_opt_replies(&list)[0],
        (OPT_LIST_META_CONTEXT, REP_META_CONTEXT, context)
    );
    let list = h.feed(&option(
        OPT_LIST_META_CONTEXT,
        &meta_data("disk", &["x-foo:bar"]),
    ));
    assert_eq!(
        parse_opt_replies(&list),
        vec![(OPT_LIST_META_CONTEXT, REP_ACK, vec![])]
    );

    assert_eq!(
        h.feed(&option(OPT_STRUCTURED_REPLY, &[])),
        opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])
    );
    let set = h.feed(&option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:", "base:allocation", "x:y"]),
    ));
    let mut selected = 1u32.to_be_bytes().to_vec();
    selected.extend_from_slice(b"base:allocation");
    assert_eq!(
        parse_opt_replies(&set),
        vec![
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT, selected),
            (OPT_SET_META_CONTEXT, REP_ACK, vec![])
        ]
    );
    // GO on a different export than the one the context was set for: block status refused.
    h.feed(&option(OPT_GO, &info_data("ro", &[])));
    assert_eq!(h.events, vec![Event::ExportChosen(1)]);
    let out = h.feed(&request(0, CMD_BLOCK_STATUS, 7, 0, 4096));
    assert_eq!(chunk_error(&out), EINVAL);
}

#[test]
fn structured_go_advertises_df() {
    let mut h = Harness::negotiating();
    h.feed(&option(OPT_STRUCTURED_REPLY, &[]));
    let replies = parse_opt_replies(&h.feed(&option(OPT_GO, &info_data("disk", &[]))));
    assert_eq!(replies[0].2, export_info(SIZE, RW_FLAGS | FLAG_SEND_DF));
}

#[test]
fn simple_replies_for_every_command() {
    let mut h = Harness::transmitting(false);
    assert_eq!(
        h.feed(&write_request(CMD_FLAG_FUA, 1, 100, b"hello")),
        simple(1, 0, &[])
    );
    assert_eq!(
        h.feed(&request(0, CMD_READ, 2, 100, 5)),
        simple(2, 0, b"hello")
    );
    assert_eq!(h.feed(&request(0, CMD_FLUSH, 3, 0, 0)), simple(3, 0, &[]));
    assert_eq!(
        h.feed(&request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 101, 2)),
        simple(4, 0, &[])
    );
    assert_eq!(
        h.feed(&request(0, CMD_READ, 5, 100, 5)),
        simple(5, 0, b"h\0\0lo")
    );
    assert_eq!(h.feed(&request(0, CMD_TRIM, 6, 100, 5)), simple(6, 0, &[]));
    assert_eq!(
        h.feed(&request(0, CMD_READ, 7, 100, 5)),
        simple(7, 0, &[0; 5])
    );
    // Block status needs structured replies and a context.
    assert_eq!(
        h.feed(&request(0, CMD_BLOCK_STATUS, 8, 0, 512)),
        simple(8, EINVAL, &[])
    );
    // Zero-length requests succeed without touching the backend.
    assert_eq!(h.feed(&request(0, CMD_READ, 9, SIZE, 0)), simple(9, 0, &[]));
    assert_eq!(h.feed(&request(0, CMD_WRITE, 10, 0, 0)), simple(10, 0, &[]));
    assert_eq!(h.session.rejected(), 1);
    assert!(h.feed(&request(0, CMD_DISC, 11, 0, 0)).is_empty());
    assert_eq!(h.events, vec![Event::Close(CloseReason::Disconnect)]);
}

#[test]
fn structured_replies_for_read_block_status_and_errors() {
    let mut h = Harness::transmitting(true);
    h.feed(&write_request(0, 1, 8, b"abcd"));
    let mut payload = 8u64.to_be_bytes().to_vec();
    payload.extend_from_slice(b"abcd");
    assert_eq!(
        h.feed(&request(CMD_FLAG_DF, CMD_READ, 2, 8, 4)),
        chunk(2, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &payload)
    );
    assert_eq!(
        h.feed(&request(0, CMD_READ, 3, 0, 0)),
        chunk(3, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])
    );
    let mut status = 1u32.to_be_bytes().to_vec();
    status.extend_from_slice(&4096u32.to_be_bytes());
    status.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        h.feed(&request(0, CMD_BLOCK_STATUS, 4, 0, 4096)),
        chunk(4, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &status)
    );
    let out = h.feed(&request(0, CMD_READ, 5, SIZE, 1));
    assert_eq!(chunk_error(&out), EINVAL);
    let message = &out[26..];
    assert_eq!(
        u16::from_be_bytes(out[24..26].try_into().unwrap()) as usize,
        message.len()
    );
    assert_eq!(message, b"request extends beyond the end of the export");
}

#[test]
fn block_status_extents_are_clipped_merged_and_req_one() {
    let mut h = Harness::transmitting(true);
    h.auto_reply = false;
    let hole = |len| Extent {
        len,
        hole: true,
        zero: true,
    };
    let data = |len| Extent {
        len,
        hole: false,
        zero: false,
    };
    let descriptors = |out: &[u8]| -> Vec<(u32, u32)> {
        out[24..]
            .chunks(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..].try_into().unwrap()),
                )
            })
            .collect()
    };
    for (flags, extents, expected) in [
        (
            0,
            vec![hole(100), hole(50), data(0), data(100), hole(1000)],
            vec![(150, 3), (100, 0), (50, 3)],
        ),
        (CMD_FLAG_REQ_ONE, vec![data(10), hole(290)], vec![(10, 0)]),
        (CMD_FLAG_REQ_ONE, vec![hole(1 << 40)], vec![(300, 3)]),
    ] {
        h.feed(&request(flags, CMD_BLOCK_STATUS, 9, 0, 300));
        let Some(Event::Request(request)) = h.events.pop() else {
            panic!("no request")
        };
        assert_eq!(request.command, Command::BlockStatus);
        h.session
            .reply(request.id, Ok(Reply::Extents(extents)))
            .unwrap();
        assert_eq!(descriptors(&h.drain()), expected);
    }
}

#[test]
fn bounds_and_lengths() {
    for structured in [false, true] {
        let mut h = Harness::transmitting(structured);
        let code = |out: Vec<u8>| {
            if structured {
                chunk_error(&out)
            } else {
                u32::from_be_bytes(out[4..8].try_into().unwrap())
            }
        };
        assert_eq!(code(h.feed(&request(0, CMD_READ, 1, SIZE - 1, 2))), EINVAL);
        assert_eq!(code(h.feed(&request(0, CMD_READ, 1, u64::MAX, 1))), EINVAL);
        assert_eq!(code(h.feed(&write_request(0, 2, SIZE - 1, b"ab"))), ENOSPC);
        assert_eq!(
            code(h.feed(&request(0, CMD_WRITE_ZEROES, 3, SIZE, 1))),
            ENOSPC
        );
        assert_eq!(code(h.feed(&request(0, CMD_TRIM, 4, SIZE, 1))), EINVAL);
        let too_long = if structured { EOVERFLOW } else { EINVAL };
        assert_eq!(
            code(h.feed(&request(0, CMD_READ, 5, 0, MAX_PAYLOAD_BYTES + 1))),
            too_long
        );
        assert_eq!(
            code(h.feed(&request(0, 99, 6, 0, 0))),
            EINVAL,
            "unknown command"
        );
        assert_eq!(
            code(h.feed(&request(1 << 4, CMD_WRITE_ZEROES, 7, 0, 1))),
            EINVAL,
            "FAST_ZERO not offered"
        );
        assert_eq!(
            code(h.feed(&request(CMD_FLAG_NO_HOLE, CMD_READ, 8, 0, 1))),
            EINVAL,
            "flag of another command"
        );
        assert_eq!(
            code(h.feed(&request(0x8000, CMD_FLUSH, 9, 0, 0))),
            EINVAL,
            "unknown flag"
        );
        if !structured {
            assert_eq!(
                code(h.feed(&request(CMD_FLAG_DF, CMD_READ, 10, 0, 1))),
                EINVAL,
                "DF needs structured replies"
            );
        }
        assert!(
            h.events.is_empty(),
            "nothing reached the backend: {:?}",
            h.events
        );
        // Still serving.
        assert_eq!(h.feed(&request(0, CMD_FLUSH, 11, 0, 0)), simple(11, 0, &[]));
    }
}

#[test]
fn oversized_write_answers_and_closes() {
    let mut h = Harness::transmitting(false);
    let out = h.feed(&request(0, CMD_WRITE, 1, 0, MAX_PAYLOAD_BYTES + 1));
    assert_eq!(out, simple(1, EINVAL, &[]));
    assert_eq!(
        h.events,
        vec![Event::Close(CloseReason::Violation(
            ProtocolError::WriteTooLong {
                cookie: 1,
                len: MAX_PAYLOAD_BYTES + 1
            }
        ))]
    );
}

#[test]
fn bad_request_magic_closes() {
    let mut h = Harness::transmitting(false);
    let mut bytes = request(0, CMD_READ, 1, 0, 1);
    bytes[3] = 0x14;
    assert!(h.feed(&bytes).is_empty());
    assert_eq!(
        h.events,
        vec![Event::Close(CloseReason::Violation(
            ProtocolError::BadRequestMagic(0x2560_9514)
        ))]
    );
}

#[test]
fn read_only_export_refuses_writes() {
    let mut h = Harness::negotiating();
    h.feed(&option(OPT_GO, &info_data("ro", &[])));
    for bytes in [
        write_request(0, 1, 0, b"x"),
        request(0, CMD_TRIM, 1, 0, 1),
        request(0, CMD_WRITE_ZEROES, 1, 0, 1),
        request(0, CMD_WRITE, 1, 0, 0),
    ] {
        assert_eq!(h.feed(&bytes), simple(1, EPERM, &[]));
    }
    assert_eq!(h.feed(&request(0, CMD_READ, 2, 0, 1)), simple(2, 0, &[0]));
    assert_eq!(h.feed(&request(0, CMD_FLUSH, 3, 0, 0)), simple(3, 0, &[]));
}

#[test]
fn disconnect_waits_for_in_flight_replies() {
    let mut h = Harness::transmitting(false);
    h.auto_reply = false;
    let mut bytes = request(0, CMD_FLUSH, 1, 0, 0);
    bytes.extend(request(0, CMD_DISC, 2, 0, 0));
    bytes.extend(request(0, CMD_FLUSH, 3, 0, 0)); // after DISC: ignored
    h.feed(&bytes);
    let Some(Event::Request(flush)) = h.events.pop() else {
        panic!("no flush")
    };
    assert!(
        h.events.is_empty() && h.session.poll_event().is_none(),
        "no close before the reply"
    );
    h.session.reply(flush.id, Ok(Reply::Done)).unwrap();
    assert_eq!(h.drain(), simple(1, 0, &[]));
    assert_eq!(h.events, vec![Event::Close(CloseReason::Disconnect)]);
}

#[test]
fn replies_out_of_order_and_driver_mistakes() {
    let mut h = Harness::transmitting(false);
    h.auto_reply = false;
    let mut bytes = request(0, CMD_READ, 1, 0, 2);
    bytes.extend(request(0, CMD_FLUSH, 2, 0, 0));
    bytes.extend(request(0, CMD_READ, 3, 0, 2));
    h.feed(&bytes);
    let [Event::Request(a), Event::Request(b), Event::Request(c)] = &h.events[..] else {
        panic!("{:?}", h.events)
    };
    let (a, b, c) = (a.id, b.id, c.id);
    h.session.reply(b, Ok(Reply::Done)).unwrap();
    h.session.reply(a, Err(NbdError::Io)).unwrap();
    assert_eq!(
        h.session.reply(c, Ok(Reply::Data(vec![1]))),
        Err(ReplyError::Mismatch {
            id: c,
            what: "read data of the wrong length"
        })
    );
    assert_eq!(
        h.session.reply(c, Ok(Reply::Done)),
        Err(ReplyError::UnknownRequest(c))
    );
    assert_eq!(
        h.session.reply(RequestId(999), Ok(Reply::Done)),
        Err(ReplyError::UnknownRequest(RequestId(999)))
    );
    let mut expected = simple(2, 0, &[]);
    expected.extend(simple(1, EIO, &[]));
    expected.extend(simple(3, EIO, &[]));
    assert_eq!(h.session.take_output(), expected);
}

#[test]
fn in_flight_requests_are_bounded() {
    let mut h = Harness::transmitting(false);
    h.auto_reply = false;
    let bytes: Vec<u8> = (0..MAX_IN_FLIGHT as u64 + 5)
        .flat_map(|i| request(0, CMD_FLUSH, i, 0, 0))
        .collect();
    h.feed(&bytes);
    assert_eq!(h.events.len(), MAX_IN_FLIGHT);
    assert_eq!(h.session.in_flight(), MAX_IN_FLIGHT);
    let Event::Request(first) = h.events.remove(0) else {
        panic!()
    };
    h.session.reply(first.id, Ok(Reply::Done)).unwrap();
    h.drain();
    assert_eq!(
        h.events.len(),
        MAX_IN_FLIGHT,
        "one answered, one more parsed"
    );
}

#[test]
fn byte_at_a_time_input_gives_the_same_output() {
    let mut script = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    script.extend(option(OPT_LIST, &[]));
    script.extend(option(OPT_STRUCTURED_REPLY, &[]));
    script.extend(option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    ));
    script.extend(option(OPT_GO, &info_data("disk", &[INFO_NAME])));
    script.extend(write_request(0, 1, 10, &[5; 3000]));
    script.extend(request(0, CMD_READ, 2, 0, 4000));
    script.extend(request(0, CMD_BLOCK_STATUS, 3, 0, 4000));
    script.extend(request(0, CMD_DISC, 4, 0, 0));
    let run = |chunk: usize| {
        let mut h = Harness::new(vec![export("disk", SIZE, false)]);
        let out: Vec<u8> = script.chunks(chunk).flat_map(|c| h.feed(c)).collect();
        (out, h.events)
    };
    let whole = run(script.len());
    assert_eq!(whole.1.last(), Some(&Event::Close(CloseReason::Disconnect)));
    assert_eq!(run(1), whole);
    assert_eq!(run(7), whole);
}

#[test]
fn end_of_input() {
    let mut h = Harness::transmitting(false);
    h.session.input_eof();
    h.drain();
    assert_eq!(h.events, vec![Event::Close(CloseReason::HangUp)]);

    let mut h = Harness::transmitting(false);
    h.feed(&request(0, CMD_READ, 1, 0, 1)[..10]);
    h.session.input_eof();
    h.drain();
    assert_eq!(
        h.events,
        vec![Event::Close(CloseReason::Violation(
            ProtocolError::Truncated { buffered: 10 }
        ))]
    );
}

#[test]
fn buffered_input_is_bounded_while_requests_are_in_flight() {
    use tern_nbd::proto::MAX_BUFFERED_INPUT_BYTES;
    let mut h = Harness::transmitting(false);
    h.auto_reply = false;
    let flushes: Vec<u8> = (0..MAX_IN_FLIGHT as u64)
        .flat_map(|i| request(0, CMD_FLUSH, i, 0, 0))
        .collect();
    h.feed(&flushes);
    assert_eq!(h.session.in_flight(), MAX_IN_FLIGHT);
    // Nothing more is parsed now: what follows stays buffered, up to the bound.
    let chunk = write_request(0, 99, 0, &[7; 4096]);
    let mut fed = 0;
    while h.session.input_room() >= chunk.len() {
        h.feed(&chunk);
        fed += chunk.len();
    }
    assert_eq!(h.session.input_room(), MAX_BUFFERED_INPUT_BYTES - fed);
    assert!(!h.events.iter().any(|e| matches!(e, Event::Close(_))));
    // A driver that ignores the room left breaks the contract: the session closes.
    h.feed(&chunk);
    assert!(
        h.events.iter().any(|e| matches!(
            e,
            Event::Close(CloseReason::Violation(ProtocolError::InputOverflow { .. }))
        )),
        "{:?}",
        h.events.last()
    );
}
