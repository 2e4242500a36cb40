//! The control codec's decoders: the first byte picks the frame kind, the
//! rest is the body, fed to the Request, Reply and Event decoders. What
//! decodes must encode back to the same bytes (then decode to the same
//! message).
#![no_main]

use bubble_vmm::control::{Event, Kind, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    if let Ok(req) = Request::decode(kind, body) {
        if let Ok(frame) = req.frame(1) {
            assert_eq!(&frame[13..], body);
            assert_eq!(Request::decode(kind, &frame[13..]).ok(), Some(req));
        }
    }
    if let Ok(rep) = Reply::decode(kind, body.to_vec()) {
        let again = rep.body().into_owned();
        assert_eq!(Reply::decode(kind, again).ok(), Some(rep));
    }
    if let Ok(ev) = Event::decode(kind, body) {
        assert_eq!(Event::decode(kind, &ev.body()).ok(), Some(ev));
        assert!(Kind::is_event(kind));
    }
});
