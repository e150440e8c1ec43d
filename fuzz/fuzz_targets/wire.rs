//! One input: a request (first byte even) or an instance's response (odd) for the fast
//! path's parser and hyper; they must agree on the message and its end, or both refuse it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = redirector::activator::differential::check(data) {
        panic!("fast path and hyper disagree: {e}");
    }
});
