#![no_main]
//! The site agent's request frame (`tern-node/src/agent.rs`), the bytes a peer site sends
//! over an agent stream: arbitrary bytes decode or fail, never panic; a decoded request
//! passed its bounds and re-encodes to a frame that decodes to the same request; every
//! prefix of a frame is "incomplete" or an error, never a different request. Replies are
//! parsed too (a relaying node's client reads them).
use libfuzzer_sys::fuzz_target;
use tern_node::agent::{
    MAX_REQUEST_FRAME, decode_reply, decode_request, encode_reply, encode_request,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((f, used))) = decode_request(data) {
        assert!(used <= data.len() && used <= MAX_REQUEST_FRAME);
        assert!(f.request.validate().is_ok());
        let enc = encode_request(&f.site, &f.request);
        let (back, n) = decode_request(&enc).unwrap().unwrap();
        assert_eq!((back, n), (f.clone(), enc.len()));
        for cut in [0, 1, 2, used / 2, used.saturating_sub(1)] {
            if cut < used {
                assert!(!matches!(decode_request(&data[..cut]), Ok(Some(_))));
            }
        }
    }
    if let Ok(Some((r, used))) = decode_reply(data) {
        assert!(used <= data.len());
        let enc = encode_reply(&r);
        assert_eq!(decode_reply(&enc), Ok(Some((r, enc.len()))));
    }
});
