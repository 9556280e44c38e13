//! Round trips for every codec in both directions, and decoders fed garbage.

use super::*;
use proptest::prelude::*;

fn string() -> impl Strategy<Value = String> {
    "\\PC{0,48}"
}

fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    f(&mut out);
    out
}

fn info_strategy() -> impl Strategy<Value = Info> {
    prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| Info::Export { size, flags }),
        string().prop_map(Info::Name),
        string().prop_map(Info::Description),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            }
        }),
        (4u16..).prop_map(Info::Unknown),
    ]
}

proptest! {
    #[test]
    fn greeting_round_trips(old in any::<bool>()) {
        let g = if old { GreetingStart::Oldstyle } else { GreetingStart::Newstyle };
        let bytes = encoded(|b| g.encode(b));
        prop_assert_eq!(bytes.len(), GreetingStart::LEN);
        prop_assert_eq!(&bytes[..8], b"NBDMAGIC");
        if !old {
            prop_assert_eq!(&bytes[8..], b"IHAVEOPT");
        }
        prop_assert_eq!(GreetingStart::decode(&bytes), Ok(g));
    }

    #[test]
    fn greeting_rejects_wrong_magics_and_lengths(
        mut bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 16),
            prop::collection::vec(any::<u8>(), 0..40),
        ],
        real_first_magic in any::<bool>(),
    ) {
        if real_first_magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        }
        match GreetingStart::decode(&bytes) {
            Ok(GreetingStart::Oldstyle) => prop_assert_eq!(be64(&bytes, 8), OLDSTYLE_MAGIC),
            Ok(GreetingStart::Newstyle) => prop_assert_eq!(be64(&bytes, 8), IHAVEOPT),
            Err(DecodeError::Length { need, got, .. }) => {
                prop_assert_eq!(need, 16);
                prop_assert_eq!(got, bytes.len());
                prop_assert_ne!(bytes.len(), 16);
            }
            Err(DecodeError::Magic { found, .. }) => {
                prop_assert_eq!(bytes.len(), 16);
                prop_assert!(found == be64(&bytes, 0) || found == be64(&bytes, 8));
            }
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    #[test]
    fn oldstyle_rest_round_trips(size in any::<u64>(), flags in any::<u32>()) {
        let rest = OldstyleRest { size, flags };
        let bytes = encoded(|b| rest.encode(b));
        prop_assert_eq!(bytes.len(), OldstyleRest::LEN);
        prop_assert!(bytes[12..].iter().all(|&b| b == 0));
        prop_assert_eq!(OldstyleRest::decode(&bytes), Ok(rest));
        prop_assert!(matches!(OldstyleRest::decode(&bytes[1..]), Err(DecodeError::Length { .. })), "unexpected decode result");
    }

    #[test]
    fn export_name_reply_round_trips_with_and_without_padding(
        size in any::<u64>(), flags in any::<u16>(), zeroes in any::<bool>()
    ) {
        let reply = ExportNameReply { size, flags };
        let bytes = encoded(|b| reply.encode(zeroes, b));
        prop_assert_eq!(bytes.len(), if zeroes { 10 + ZERO_PAD_LEN } else { 10 });
        prop_assert!(bytes[10..].iter().all(|&b| b == 0));
        prop_assert_eq!(ExportNameReply::decode(&bytes[..ExportNameReply::LEN]), Ok(reply));
        prop_assert!(ExportNameReply::decode(&bytes[..9]).is_err());
    }

    #[test]
    fn option_request_round_trips(option in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..300)) {
        let bytes = encoded(|b| OptionRequest::encode_with(option, &data, b));
        prop_assert_eq!(bytes.len(), OptionRequest::LEN + data.len());
        let header = OptionRequest::decode(&bytes[..OptionRequest::LEN]).unwrap();
        prop_assert_eq!(header, OptionRequest { option, length: data.len() as u32 });
        prop_assert_eq!(&bytes[OptionRequest::LEN..], &data[..]);
        let mut bad = bytes[..16].to_vec();
        bad[0] ^= 0x80;
        let rejected = matches!(OptionRequest::decode(&bad), Err(DecodeError::Magic { .. }));
        prop_assert!(rejected);
        prop_assert!(OptionRequest::decode(&bytes[..15]).is_err());
    }

    #[test]
    fn info_request_round_trips_and_rejects_truncation(
        name in string(), requests in prop::collection::vec(any::<u16>(), 0..8), cut in any::<prop::sample::Index>()
    ) {
        let bytes = encoded(|b| InfoRequest::encode(&name, &requests, b));
        prop_assert_eq!(bytes.len(), 4 + name.len() + 2 + 2 * requests.len());
        let expected = InfoRequest { name: name.clone(), requests: requests.clone() };
        prop_assert_eq!(InfoRequest::decode(&bytes), Ok(expected));
        // Every strict prefix and any extra byte are refused.
        let at = cut.index(bytes.len());
        prop_assert!(InfoRequest::decode(&bytes[..at]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(InfoRequest::decode(&longer).is_err());
    }

    #[test]
    fn option_reply_header_round_trips(option in any::<u32>(), reply_type in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..100)) {
        let bytes = encoded(|b| OptionReplyHeader::encode_with(option, reply_type, &data, b));
        let header = OptionReplyHeader::decode(&bytes[..OptionReplyHeader::LEN]).unwrap();
        prop_assert_eq!(header, OptionReplyHeader { option, reply_type, length: data.len() as u32 });
        prop_assert_eq!(&bytes[OptionReplyHeader::LEN..], &data[..]);
        let again = encoded(|b| header.encode(b));
        prop_assert_eq!(&again[..], &bytes[..OptionReplyHeader::LEN]);
        let mut bad = again.clone();
        bad[7] ^= 1;
        let rejected = matches!(OptionReplyHeader::decode(&bad), Err(DecodeError::Magic { .. }));
        prop_assert!(rejected);
        prop_assert!(OptionReplyHeader::decode(&again[..19]).is_err());
    }

    #[test]
    fn server_entry_round_trips(name in string(), description in string()) {
        let entry = ServerEntry { name, description };
        let bytes = encoded(|b| entry.encode(b));
        prop_assert_eq!(ServerEntry::decode(&bytes), Ok(entry.clone()));
        // A name length beyond the data is refused.
        let mut bad = bytes.clone();
        let too_long = (bytes.len() - 4 + 1) as u32;
        bad[..4].copy_from_slice(&too_long.to_be_bytes());
        prop_assert!(ServerEntry::decode(&bad).is_err());
        prop_assert!(ServerEntry::decode(&bytes[..bytes.len().min(3)]).is_err());
    }

    #[test]
    fn info_round_trips(info in info_strategy()) {
        let bytes = encoded(|b| info.encode(b));
        prop_assert_eq!(Info::decode(&bytes), Ok(info.clone()));
        if matches!(info, Info::Export { .. } | Info::BlockSize { .. }) {
            // Fixed-size bodies: one byte more or less is refused.
            prop_assert!(Info::decode(&bytes[..bytes.len() - 1]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(Info::decode(&longer).is_err());
        }
    }

    #[test]
    fn request_header_round_trips_compact_and_extended(
        flags in any::<u16>(), command in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(),
        length in any::<u64>()
    ) {
        let compact = RequestHeader { flags, command, cookie, offset, length: length & 0xffff_ffff };
        let bytes = encoded(|b| compact.encode_compact(b));
        prop_assert_eq!(bytes.len(), REQUEST_LEN);
        prop_assert_eq!(RequestHeader::decode(&bytes), Ok(compact));
        prop_assert!(matches!(RequestHeader::decode(&bytes[..27]), Err(DecodeError::Length { need: 28, .. })), "unexpected decode result");

        let extended = RequestHeader { length, ..compact };
        let bytes = encoded(|b| extended.encode_extended(b));
        prop_assert_eq!(bytes.len(), EXTENDED_REQUEST_LEN);
        prop_assert_eq!(RequestHeader::decode(&bytes), Ok(extended));
        prop_assert!(matches!(RequestHeader::decode(&bytes[..28]), Err(DecodeError::Length { need: 32, .. })), "unexpected decode result");

        let mut bad = bytes.clone();
        bad[0] ^= 0x40;
        prop_assert!(matches!(RequestHeader::decode(&bad), Err(DecodeError::Magic { .. })), "unexpected decode result");
    }

    #[test]
    fn simple_reply_round_trips(error in any::<u32>(), cookie in any::<u64>()) {
        let reply = SimpleReply { error, cookie };
        let bytes = encoded(|b| reply.encode(b));
        prop_assert_eq!(bytes.len(), SIMPLE_REPLY_LEN);
        prop_assert_eq!(SimpleReply::decode(&bytes), Ok(reply));
        let mut bad = bytes.clone();
        bad[2] ^= 1;
        prop_assert!(matches!(SimpleReply::decode(&bad), Err(DecodeError::Magic { .. })), "unexpected decode result");
        prop_assert!(SimpleReply::decode(&bytes[..15]).is_err());
    }

    #[test]
    fn chunk_header_round_trips_structured_and_extended(
        flags in any::<u16>(), chunk_type in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(),
        length in any::<u64>()
    ) {
        let structured = ChunkHeader { flags, chunk_type, cookie, offset: 0, length: length & 0xffff_ffff };
        let bytes = encoded(|b| structured.encode_structured(b));
        prop_assert_eq!(bytes.len(), STRUCTURED_REPLY_LEN);
        prop_assert_eq!(ChunkHeader::decode_structured(&bytes), Ok(structured));
        // The magics are not interchangeable.
        prop_assert!(ChunkHeader::decode_extended(&bytes).is_err());

        let extended = ChunkHeader { offset, length, ..structured };
        let bytes = encoded(|b| extended.encode_extended(b));
        prop_assert_eq!(bytes.len(), EXTENDED_REPLY_LEN);
        prop_assert_eq!(ChunkHeader::decode_extended(&bytes), Ok(extended));
        prop_assert!(ChunkHeader::decode_structured(&bytes[..20]).is_err());
        let mut bad = bytes.clone();
        bad[3] ^= 1;
        prop_assert!(matches!(ChunkHeader::decode_extended(&bad), Err(DecodeError::Magic { .. })), "unexpected decode result");
    }

    #[test]
    fn hole_chunk_round_trips(offset in any::<u64>(), length in any::<u32>()) {
        let hole = HoleChunk { offset, length };
        let bytes = encoded(|b| hole.encode(b));
        prop_assert_eq!(bytes.len(), HoleChunk::LEN);
        prop_assert_eq!(HoleChunk::decode(&bytes), Ok(hole));
        prop_assert!(HoleChunk::decode(&bytes[..11]).is_err());
    }

    #[test]
    fn error_chunk_round_trips_for_error_and_error_offset(
        error in 1u32.., message in string(), offset in any::<u64>()
    ) {
        let plain = ErrorChunk { error, message: message.clone(), offset: None };
        let bytes = encoded(|b| plain.encode(b));
        prop_assert_eq!(ErrorChunk::decode(REPLY_TYPE_ERROR, &bytes), Ok(plain.clone()));
        // ERROR_OFFSET needs its 8 bytes.
        prop_assert!(ErrorChunk::decode(REPLY_TYPE_ERROR_OFFSET, &bytes).is_err());
        // An unknown error type: no offset, trailing bytes allowed.
        let mut extra = bytes.clone();
        extra.extend_from_slice(&[1, 2, 3]);
        prop_assert_eq!(ErrorChunk::decode(REPLY_TYPE_FLAG_ERROR | 9, &extra), Ok(plain));

        let at = ErrorChunk { error, message, offset: Some(offset) };
        let bytes = encoded(|b| at.encode(b));
        prop_assert_eq!(ErrorChunk::decode(REPLY_TYPE_ERROR_OFFSET, &bytes), Ok(at));
        // ERROR refuses bytes after the message.
        prop_assert!(ErrorChunk::decode(REPLY_TYPE_ERROR, &bytes).is_err());
        prop_assert!(ErrorChunk::decode(REPLY_TYPE_ERROR_OFFSET, &bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn error_chunk_rejects_error_zero_and_overlong_messages(message in string(), extra in 1u16..100) {
        let zero = encoded(|b| ErrorChunk { error: 0, message: message.clone(), offset: None }.encode(b));
        prop_assert!(matches!(ErrorChunk::decode(REPLY_TYPE_ERROR, &zero), Err(DecodeError::Invalid { .. })), "unexpected decode result");
        let mut bytes = encoded(|b| ErrorChunk { error: EIO, message: message.clone(), offset: None }.encode(b));
        let claimed = message.len() as u16 + extra;
        bytes[4..6].copy_from_slice(&claimed.to_be_bytes());
        prop_assert!(matches!(ErrorChunk::decode(REPLY_TYPE_ERROR, &bytes), Err(DecodeError::Invalid { .. })), "unexpected decode result");
    }

    /// Every decoder, any bytes: an answer, never a panic.
    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..80), t in any::<u16>()) {
        let _ = GreetingStart::decode(&bytes);
        let _ = OldstyleRest::decode(&bytes);
        let _ = ExportNameReply::decode(&bytes);
        let _ = OptionRequest::decode(&bytes);
        let _ = InfoRequest::decode(&bytes);
        let _ = OptionReplyHeader::decode(&bytes);
        let _ = ServerEntry::decode(&bytes);
        let _ = Info::decode(&bytes);
        let _ = RequestHeader::decode(&bytes);
        let _ = SimpleReply::decode(&bytes);
        let _ = ChunkHeader::decode_structured(&bytes);
        let _ = ChunkHeader::decode_extended(&bytes);
        let _ = HoleChunk::decode(&bytes);
        for chunk_type in [t, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET] {
            let _ = ErrorChunk::decode(chunk_type, &bytes);
        }
        let _ = decode_string("test", &bytes);
    }

    /// Length fields claiming more than is there are refused, whatever they say.
    #[test]
    fn length_prefixed_decoders_refuse_lies(claim in any::<u32>(), body in prop::collection::vec(any::<u8>(), 0..20)) {
        let mut bytes = claim.to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let fits = (claim as usize) <= body.len();
        prop_assert_eq!(ServerEntry::decode(&bytes).is_ok(), fits);
        if (claim as usize).saturating_add(2) > body.len() {
            prop_assert!(InfoRequest::decode(&bytes).is_err());
        }
    }
}

#[test]
fn decode_string_limits_length_and_replaces_invalid_utf8() {
    let max = vec![b'a'; MAX_STRING_LEN];
    assert_eq!(decode_string("t", &max).unwrap().len(), MAX_STRING_LEN);
    let over = vec![b'a'; MAX_STRING_LEN + 1];
    assert!(matches!(
        decode_string("t", &over),
        Err(DecodeError::Invalid { what: "t", .. })
    ));
    assert_eq!(decode_string("t", b"ok\xff").unwrap(), "ok\u{fffd}");
    // The limit applies inside messages too.
    let long = "x".repeat(MAX_STRING_LEN + 1);
    let bytes = encoded(|b| Info::Name(long.clone()).encode(b));
    assert!(Info::decode(&bytes).is_err());
    let bytes = encoded(|b| {
        ServerEntry {
            name: String::new(),
            description: long,
        }
        .encode(b)
    });
    assert!(ServerEntry::decode(&bytes).is_err());
}

#[test]
fn decode_errors_say_what_and_why() {
    let e = SimpleReply::decode(&[0; 3]).unwrap_err();
    assert_eq!(
        e,
        DecodeError::Length {
            what: "simple reply",
            need: 16,
            got: 3
        }
    );
    assert_eq!(e.to_string(), "simple reply: expected 16 bytes, got 3");
    let e = SimpleReply::decode(&[0; 16]).unwrap_err();
    assert_eq!(e.to_string(), "simple reply: bad magic 0x0");
}

#[test]
fn wire_constants_match_the_specification() {
    assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
    assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    assert_eq!(OLDSTYLE_MAGIC, 0x00420281861253); // as the specification writes it
    assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    assert_eq!(REQUEST_MAGIC, 0x2560_9513);
    assert_eq!(SIMPLE_REPLY_MAGIC, 0x6744_6698);
    assert_eq!(STRUCTURED_REPLY_MAGIC, 0x668e_33ef);
    assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
    assert_eq!(REPLY_TYPE_ERROR, 0x8001);
    assert_eq!(REPLY_TYPE_ERROR_OFFSET, 0x8002);
}

// ---------------------------------------------------------------- meta contexts and block status

fn pairs_strategy() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((any::<u64>(), any::<u64>()), 1..24)
}

fn chunk_of(context_id: u32, pairs: &[(u64, u64)]) -> BlockStatusChunk {
    BlockStatusChunk {
        context_id,
        extents: pairs
            .iter()
            .map(|&(length, flags)| Extent { length, flags })
            .collect(),
    }
}

proptest! {
    #[test]
    fn meta_context_request_round_trips_and_rejects_truncation_and_trailing_bytes(
        name in string(),
        queries in prop::collection::vec(string(), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = encoded(|b| MetaContextRequest::encode(&name, &queries, b));
        let want_len = 4 + name.len() + 4 + queries.iter().map(|q| 4 + q.len()).sum::<usize>();
        prop_assert_eq!(bytes.len(), want_len);
        prop_assert_eq!(be32(&bytes, 0) as usize, name.len());
        prop_assert_eq!(be32(&bytes, 4 + name.len()) as usize, queries.len());
        let expected = MetaContextRequest { name: name.clone(), queries: queries.clone() };
        prop_assert_eq!(MetaContextRequest::decode(&bytes), Ok(expected));
        // Every strict prefix is refused, and so is a byte more.
        let at = cut.index(bytes.len());
        prop_assert!(MetaContextRequest::decode(&bytes[..at]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        let trailing = matches!(MetaContextRequest::decode(&longer), Err(DecodeError::Invalid { .. }));
        prop_assert!(trailing);
    }

    #[test]
    fn meta_context_request_refuses_a_query_count_beyond_the_data(
        name in string(), queries in prop::collection::vec(string(), 0..4), extra in 1u32..1000,
    ) {
        let mut bytes = encoded(|b| MetaContextRequest::encode(&name, &queries, b));
        let at = 4 + name.len();
        let claimed = queries.len() as u32 + extra;
        bytes[at..at + 4].copy_from_slice(&claimed.to_be_bytes());
        prop_assert!(MetaContextRequest::decode(&bytes).is_err());
    }

    #[test]
    fn meta_context_reply_round_trips(id in any::<u32>(), name in string()) {
        let reply = MetaContextReply { id, name: name.clone() };
        let bytes = encoded(|b| reply.encode(b));
        prop_assert_eq!(bytes.len(), 4 + name.len());
        prop_assert_eq!(&bytes[..4], &id.to_be_bytes());
        prop_assert_eq!(MetaContextReply::decode(&bytes), Ok(reply));
        for short in 0..4 {
            let refused = matches!(
                MetaContextReply::decode(&bytes[..short]),
                Err(DecodeError::Length { need: 4, .. })
            );
            prop_assert!(refused);
        }
    }

    #[test]
    fn extended_block_status_round_trips_64_bit_extents(
        context_id in any::<u32>(), pairs in pairs_strategy(),
    ) {
        let chunk = chunk_of(context_id, &pairs);
        let bytes = encoded(|b| chunk.encode(true, b));
        prop_assert_eq!(bytes.len(), 8 + 16 * pairs.len());
        prop_assert_eq!(be32(&bytes, 4) as usize, pairs.len());
        prop_assert_eq!(BlockStatusChunk::decode(true, &bytes), Ok(chunk));
        // Not a compact payload (4 + 8n never equals 8 + 16m).
        prop_assert!(BlockStatusChunk::decode(false, &bytes).is_err());
        // A missing byte, a missing descriptor or a wrong count is refused.
        prop_assert!(BlockStatusChunk::decode(true, &bytes[..bytes.len() - 1]).is_err());
        prop_assert!(BlockStatusChunk::decode(true, &bytes[..bytes.len() - 16]).is_err());
        let mut miscounted = bytes.clone();
        miscounted[4..8].copy_from_slice(&(pairs.len() as u32 + 1).to_be_bytes());
        let refused = matches!(BlockStatusChunk::decode(true, &miscounted), Err(DecodeError::Invalid { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn compact_block_status_round_trips_32_bit_extents(
        context_id in any::<u32>(), pairs in pairs_strategy(),
    ) {
        let narrow: Vec<(u64, u64)> = pairs
            .iter()
            .map(|&(l, f)| (l & 0xffff_ffff, f & 0xffff_ffff))
            .collect();
        let chunk = chunk_of(context_id, &narrow);
        let bytes = encoded(|b| chunk.encode(false, b));
        prop_assert_eq!(bytes.len(), 4 + 8 * pairs.len());
        prop_assert_eq!(BlockStatusChunk::decode(false, &bytes), Ok(chunk.clone()));
        // The server-side compact encoder keeps the low 32 bits of wider values.
        let wide = encoded(|b| chunk_of(context_id, &pairs).encode(false, b));
        prop_assert_eq!(&wide, &bytes);
        // Not an extended payload (8 + 16m never equals 4 + 8n).
        prop_assert!(BlockStatusChunk::decode(true, &bytes).is_err());
        prop_assert!(BlockStatusChunk::decode(false, &bytes[..bytes.len() - 1]).is_err());
        // Just the context id: no extent, refused.
        prop_assert!(BlockStatusChunk::decode(false, &bytes[..4]).is_err());
    }

    #[test]
    fn extent_to_u32_is_exact_or_an_overflow(length in any::<u64>(), flags in any::<u64>()) {
        let fits = length <= u64::from(u32::MAX) && flags <= u64::from(u32::MAX);
        match (Extent { length, flags }).to_u32() {
            Ok((l, f)) => {
                prop_assert!(fits);
                prop_assert_eq!(u64::from(l), length);
                prop_assert_eq!(u64::from(f), flags);
            }
            Err(e) => {
                prop_assert!(!fits);
                prop_assert!(matches!(e, crate::Error::Overflow(_)), "{e:?}");
            }
        }
    }

    /// The new decoders, any bytes: an answer, never a panic.
    #[test]
    fn meta_and_status_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        let _ = MetaContextRequest::decode(&bytes);
        let _ = MetaContextReply::decode(&bytes);
        for extended in [false, true] {
            if let Ok(chunk) = BlockStatusChunk::decode(extended, &bytes) {
                prop_assert!(!chunk.extents.is_empty());
            }
        }
    }
}

#[test]
fn meta_and_status_constants_match_the_specification() {
    assert_eq!(OPT_LIST_META_CONTEXT, 9);
    assert_eq!(OPT_SET_META_CONTEXT, 10);
    assert_eq!(OPT_EXTENDED_HEADERS, 11);
    assert_eq!(REP_META_CONTEXT, 4);
    assert_eq!(REP_ERR_EXT_HEADER_REQD, 0x8000_000a);
    assert_eq!(EXTENDED_REQUEST_MAGIC, 0x21e4_1c71);
    assert_eq!(EXTENDED_REPLY_MAGIC, 0x6e8a_278c);
    assert_eq!(REPLY_TYPE_BLOCK_STATUS, 5);
    assert_eq!(REPLY_TYPE_BLOCK_STATUS_EXT, 6);
    assert_eq!(CMD_BLOCK_STATUS, 7);
    assert_eq!(CMD_FLAG_REQ_ONE, 1 << 3);
    assert_eq!(CMD_FLAG_PAYLOAD_LEN, 1 << 5);
    assert_eq!(FLAG_BLOCK_STATUS_PAYLOAD, 1 << 12);
}

#[test]
fn fields_longer_than_their_length_field_are_cut_never_a_panic() {
    let long = ErrorChunk {
        error: EIO,
        message: "m".repeat(70_000),
        offset: Some(9),
    };
    let mut out = Vec::new();
    long.encode(&mut out);
    let back = ErrorChunk::decode(REPLY_TYPE_ERROR_OFFSET, &out);
    // Well framed: 6 + 65535 + 8 bytes, the message cut to what 16 bits say
    // (and then refused by the decoder for exceeding the string limit).
    assert_eq!(out.len(), 6 + usize::from(u16::MAX) + 8);
    assert!(back.is_err());
    let mut requests = Vec::new();
    InfoRequest::encode("", &vec![INFO_NAME; 70_000], &mut requests);
    assert_eq!(requests.len(), 4 + 2 + 2 * usize::from(u16::MAX));
    assert_eq!(
        InfoRequest::decode(&requests).unwrap().requests.len(),
        usize::from(u16::MAX)
    );
}
