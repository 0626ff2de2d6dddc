//! The store's model suite (`scratchd_store::testing`) run over the client:
//! random operations through a [`Client`] to scratchd's memory backend
//! must read back exactly as a `Vec<u8>` model does, in every reply
//! framing and over several connections.

use proptest::prelude::*;
use scratchd_client::{Client, Replies};
use scratchd_store::testing::{self, Expect};

use crate::util::{options, Scratchd};

fn replies() -> impl Strategy<Value = Replies> {
    prop_oneof![
        Just(Replies::Simple),
        Just(Replies::Structured),
        Just(Replies::Extended)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn the_client_behaves_like_the_model(
        (size, ops) in testing::sized_ops(64 << 10, 256 << 10),
        replies in replies(),
        connections in 1usize..4,
    ) {
        let server = Scratchd { size, ..Scratchd::default() }.start();
        let client = Client::connect_with(&server.target, &options(connections, replies))
            .expect("connect");
        testing::check(&client, &ops, Expect { trim_zeroes: true, may_fill: false, trim_may_fill: false })?;
    }
}
