//! `nbd info`'s options against real servers, each compared with what
//! libnbd's `nbdinfo` answers on the same server: the yes/no questions and
//! their negations, `-L`, `--size --json`, `--content` / `--no-content`,
//! `contexts` in listings, `--color`, usage errors, and the message for an
//! export the server does not have; and the options newer than the installed
//! nbdinfo (`--uri`, the `"extended"` field), checked by what they say.

use std::process::{Command, Output};

use nbd_tests::libnbd_1_14::as_nbdinfo_1_14;
use nbd_tests::testkit::{nbd_binary, run_nbd};
use nbd_tests::{
    require_tool, ImageFormat, NbdServerBuilder, NbdServerExport, NbdkitBuilder, QemuNbdBuilder,
    ServerHandle,
};

const MIB: u64 = 1 << 20;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn nbdinfo_run(args: &[&str]) -> Output {
    Command::new(require_tool("nbdinfo"))
        .args(args)
        .output()
        .expect("nbdinfo runs")
}

/// The exit code of `nbd info ARGS`, with its stderr for messages.
fn nbd_info_code(args: &[&str]) -> (Option<i32>, String) {
    let out = run_nbd(["info"].iter().chain(args));
    (out.status.code(), text(&out.stderr))
}

/// `nbd info OPTION WHAT URI` must exit `want` (0 yes, 2 no) silently.
fn assert_answer(option: &str, what: &str, uri: &str, want: i32) {
    let out = run_nbd(["info", option, what, uri]);
    assert_eq!(
        out.status.code(),
        Some(want),
        "nbd info {option} {what} {uri}: {}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}

#[test]
fn questions_and_their_negations_match_nbdinfo() {
    let writable = NbdkitBuilder::memory(MIB).start();
    let read_only = NbdkitBuilder::memory(MIB).readonly().start();
    let simple = NbdkitBuilder::memory(MIB).no_sr().start();
    let mut checked = 0;
    for server in [&writable, &read_only, &simple] {
        let uri = server.uri();
        // What nbdinfo 1.14 answers (it knows --can and --is only).
        for (option, what) in [
            ("--can", "connect"),
            ("--can", "read"),
            ("--can", "write"),
            ("--can", "trim"),
            ("--can", "flush"),
            ("--can", "structured-reply"),
            ("--is", "read-only"),
            ("--is", "rotational"),
            ("--is", "tls"),
        ] {
            let theirs = nbdinfo_run(&[option, what, &uri]).status.code();
            assert!(matches!(theirs, Some(0 | 2)), "nbdinfo {option} {what}");
            let yes = theirs == Some(0);
            assert_answer(option, what, &uri, if yes { 0 } else { 2 });
            let negation = if option == "--can" {
                "--cannot"
            } else {
                "--isnt"
            };
            assert_answer(negation, what, &uri, if yes { 2 } else { 0 });
            checked += 1;
        }
        // --has / --hasnt ask about the connection: structured replies are
        // what nbdinfo's --can structured-reply says.
        let structured = nbdinfo_run(&["--can", "structured-reply", &uri])
            .status
            .code()
            == Some(0);
        assert_answer(
            "--has",
            "structured-reply",
            &uri,
            if structured { 0 } else { 2 },
        );
        assert_answer(
            "--hasnt",
            "structured-reply",
            &uri,
            if structured { 2 } else { 0 },
        );
    }
    assert_eq!(checked, 27);
    // The answers differ between the servers, so the comparison had something to tell apart.
    assert_answer("--can", "write", &writable.uri(), 0);
    assert_answer("--cannot", "write", &read_only.uri(), 0);
    assert_answer("--hasnt", "structured-reply", &simple.uri(), 0);
    // nbdkit 1.32 has no extended headers; nbdinfo 1.14 cannot ask.
    assert_answer("--has", "extended-headers", &writable.uri(), 2);
    assert_answer("--hasnt", "extended-headers", &writable.uri(), 0);
    // qemu-nbd (8.2 on) negotiates extended headers, so "has" is seen too.
    let qemu = QemuNbdBuilder::raw(MIB).persistent(true).shared(2).start();
    assert_answer("--has", "extended-headers", &qemu.uri(), 0);
    assert_answer("--hasnt", "extended-headers", &qemu.uri(), 2);
    // Without extended headers there is no block status payload either.
    assert_answer("--can", "block-status-payload", &writable.uri(), 2);
    assert_answer("--cannot", "block-status-payload", &writable.uri(), 0);
}

#[test]
fn an_unknown_feature_is_an_error_as_in_nbdinfo() {
    let server = NbdkitBuilder::memory(MIB).start();
    let uri = server.uri();
    assert_eq!(nbdinfo_run(&["--can", "fly", &uri]).status.code(), Some(1));
    for option in ["--can", "--cannot", "--is", "--isnt", "--has", "--hasnt"] {
        let (code, stderr) = nbd_info_code(&[option, "fly", &uri]);
        assert_eq!(code, Some(1), "{option} fly: {stderr}");
        assert!(stderr.contains("\"fly\""), "{option}: {stderr}");
    }
}

#[test]
fn short_list_option_matches_nbdinfo() {
    let server = NbdServerBuilder::new()
        .export("alpha", MIB)
        .export("beta", 2 * MIB)
        .start();
    let uri = server.uri();
    let theirs = nbdinfo_run(&["-L", "--json", &uri]);
    assert_eq!(theirs.status.code(), Some(0), "{}", text(&theirs.stderr));
    let ours = run_nbd(["info", "-L", "--json", &uri]);
    assert!(ours.status.success(), "{}", text(&ours.stderr));
    let long = run_nbd(["info", "--list", "--json", &uri]);
    assert_eq!(ours.stdout, long.stdout);
    let names = |out: &[u8]| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(out).expect("JSON");
        let mut names: Vec<String> = v["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .map(|e| e["export-name"].as_str().expect("name").to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&ours.stdout), names(&theirs.stdout));
    assert_eq!(names(&ours.stdout), ["alpha", "beta"]);
}

#[test]
fn size_with_json_prints_what_nbdinfo_prints() {
    let server = NbdkitBuilder::memory(1_234_567).start();
    let uri = server.uri();
    let theirs = nbdinfo_run(&["--size", "--json", &uri]);
    assert_eq!(theirs.status.code(), Some(0), "{}", text(&theirs.stderr));
    let ours = run_nbd(["info", "--size", "--json", &uri]);
    assert!(ours.status.success(), "{}", text(&ours.stderr));
    assert_eq!(text(&ours.stdout), text(&theirs.stdout));
    assert_eq!(text(&ours.stdout), "1234567\n");
}

#[test]
fn usage_errors_exit_1_as_nbdinfo_does_never_the_2_of_no() {
    let server = NbdkitBuilder::memory(MIB).start();
    let uri = server.uri();
    assert_eq!(
        nbdinfo_run(&["--no-such-option", &uri]).status.code(),
        Some(1)
    );
    for args in [
        &["info", "--no-such-option", &uri][..],
        &["info", "--can"][..],
        &["info", "--can", "read", "--is", "read-only", &uri][..],
        &["info", "--cannot", "read", "--size", &uri][..],
        &["info"][..],
        &["dump", "--no-such-option", &uri][..],
        &["copy", &uri][..],
        &["no-such-subcommand"][..],
    ] {
        let out = run_nbd(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!out.stderr.is_empty() && out.stdout.is_empty(), "{args:?}");
    }
    // Help and version are not errors.
    for args in [&["--help"][..], &["info", "--help"][..], &["--version"][..]] {
        let out = Command::new(nbd_binary())
            .args(args)
            .output()
            .expect("nbd runs");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}

/// The one line `nbd info ARGS` prints for an export the server lacks.
fn unknown_export_message(args: &[&str]) -> String {
    let (code, stderr) = nbd_info_code(args);
    assert_eq!(code, Some(1), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    lines[0].to_string()
}

#[test]
fn an_unknown_export_is_named_and_list_suggested() {
    let qemu = QemuNbdBuilder::raw(MIB)
        .export_name("good")
        .persistent(true)
        .shared(4)
        .start();
    let nbd_server = NbdServerBuilder::new().export("good", MIB).start();
    for uri in [qemu.uri_for("nope"), nbd_server.uri_for("nope")] {
        // nbdinfo fails too, and suggests --list.
        let theirs = nbdinfo_run(&[&uri]);
        assert_eq!(theirs.status.code(), Some(1));
        assert!(text(&theirs.stderr).contains("--list"));
        for options in [
            &[][..],
            &["--size"][..],
            &["--can", "read"][..],
            &["--map"][..],
            &["--map", "--totals", "--json"][..],
            &["--uri"][..],
            &["--json", "--content"][..],
        ] {
            let mut args = options.to_vec();
            args.push(&uri);
            let line = unknown_export_message(&args);
            assert!(line.starts_with("nbd: "), "{line}");
            assert!(line.contains("no export \"nope\""), "{args:?}: {line}");
            assert!(line.contains("--list"), "{args:?}: {line}");
            assert!(!line.contains("LIST_META_CONTEXT"), "{args:?}: {line}");
            // Server text is shown as written: quotes are not escaped.
            assert!(!line.contains("\\'") && !line.contains("\\\""), "{line}");
        }
    }
    // The export that exists still answers.
    assert!(run_nbd(["info", &qemu.uri_for("good")]).status.success());
    assert_answer("--can", "read", &nbd_server.uri_for("good"), 0);
}

#[test]
fn a_host_name_that_does_not_resolve_is_named() {
    let line = unknown_export_message(&["nbd://no-such-host.invalid/"]);
    assert!(line.contains("\"no-such-host.invalid\""), "{line}");
}

/// A 1 MiB image whose first sector is an MBR boot sector to file(1).
fn mbr_image() -> Vec<u8> {
    let mut image = vec![0u8; MIB as usize];
    image[510] = 0x55;
    image[511] = 0xaa;
    image
}

/// nbdkit, qemu-nbd and nbd-server, each serving [`mbr_image`] (nbd-server
/// also a second, empty export), with a name for messages.
fn three_servers() -> Vec<(&'static str, ServerHandle)> {
    vec![
        ("nbdkit", NbdkitBuilder::bytes(&mbr_image()).start()),
        (
            "qemu-nbd",
            QemuNbdBuilder::from_bytes(ImageFormat::Raw, &mbr_image())
                .export_name("disk")
                .shared(8)
                .persistent(true)
                .start(),
        ),
        (
            "nbd-server",
            NbdServerBuilder::new()
                .export_with(NbdServerExport::with_bytes("boot", &mbr_image()))
                .export("blank", MIB)
                .start(),
        ),
    ]
}

/// `nbd info ARGS`, which must succeed; its standard output.
fn nbd_info(args: &[&str]) -> String {
    let out = run_nbd(["info"].iter().chain(args));
    assert!(
        out.status.success(),
        "nbd info {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `nbdinfo ARGS`, which must succeed; its standard output.
fn nbdinfo_ok(args: &[&str]) -> String {
    let out = nbdinfo_run(args);
    assert!(
        out.status.success(),
        "nbdinfo {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn content_and_listings_match_nbdinfo_on_three_servers() {
    require_tool("file");
    for (what, server) in three_servers() {
        let uri = match what {
            "nbd-server" => server.uri_for("boot"),
            _ => server.uri(),
        };
        for args in [
            &["--list"][..],
            &["--list", "--json"][..],
            &["--list", "--content"][..],
            &["--list", "--content", "--json"][..],
            &["--no-content"][..],
            &["--no-content", "--json"][..],
        ] {
            // nbd-server 3.24 answers NBD_OPT_INFO with size 0: nbdinfo
            // believes it for one export and reads nothing ("empty"), while
            // `nbd info` shows what NBD_OPT_GO tells and reads the content
            // after it. Only the listing (size 0 in both) compares as is.
            let listing = args.contains(&"--list") && !args.contains(&"--content");
            if what == "nbd-server" && !listing {
                continue;
            }
            let mut with_uri = args.to_vec();
            with_uri.push(&uri);
            let ours = as_nbdinfo_1_14(&nbd_info(&with_uri));
            let theirs = nbdinfo_ok(&with_uri);
            assert_eq!(ours, theirs, "{what}: nbd info {args:?}");
        }
        // The single-export report reads the content by default; nbd-server
        // is left out, as nbdinfo believes its NBD_OPT_INFO size of 0 there.
        if what != "nbd-server" {
            for args in [&[][..], &["--json"][..]] {
                let mut with_uri = args.to_vec();
                with_uri.push(&uri);
                let ours = as_nbdinfo_1_14(&nbd_info(&with_uri));
                assert_eq!(ours, nbdinfo_ok(&with_uri), "{what}: nbd info {args:?}");
            }
        }
        // What was compared: file(1)'s word for the boot sector, and the
        // contexts each export offers, in the listing too.
        let listed = nbd_info(&["--list", "--content", "--json", &uri]);
        let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
        let exports = listed["exports"].as_array().expect("exports");
        assert!(!exports.is_empty(), "{what}");
        let boot = exports
            .iter()
            .find(|e| e["export-name"] != "blank")
            .expect("the boot export");
        assert_eq!(boot["content"], "DOS/MBR boot sector", "{what}");
        // Contexts are listed where structured replies make them usable
        // (nbd-server 3.24 has none), as nbdinfo lists them.
        let structured = listed["structured"] == true;
        match boot["contexts"].as_array() {
            Some(contexts) => {
                assert!(structured, "{what}");
                assert!(
                    contexts.iter().any(|c| c == "base:allocation"),
                    "{what}: {contexts:?}"
                );
            }
            None => assert!(!structured, "{what}: no contexts listed"),
        }
        let plain = nbd_info(&["--list", "--json", &uri]);
        assert!(
            !plain.contains("\"content\""),
            "{what}: no content by default with --list"
        );
        let single = nbd_info(&["--no-content", &uri]);
        assert!(!single.contains("\tcontent:"), "{what}");
        // Both at once is a usage error in both tools.
        let both = ["--content", "--no-content", uri.as_str()];
        assert_eq!(nbdinfo_run(&both).status.code(), Some(1));
        assert_eq!(nbd_info_code(&both).0, Some(1), "{what}");
    }
}

#[test]
fn colour_matches_nbdinfo_and_is_off_when_piped() {
    let server = NbdkitBuilder::bytes(&mbr_image()).readonly().start();
    let uri = server.uri();
    for args in [
        &["--color"][..],
        &["--colour", "--list"][..],
        &["--no-color", "--color"][..],
    ] {
        let mut with_uri = args.to_vec();
        with_uri.push(&uri);
        let ours = nbd_info(&with_uri);
        assert!(
            ours.contains("\x1b[22;32m") && ours.contains("\x1b[22;31m"),
            "{ours:?}"
        );
        assert_eq!(as_nbdinfo_1_14(&ours), nbdinfo_ok(&with_uri), "{args:?}");
    }
    // On a terminal (given by util-linux's `script`), colour is the default.
    if nbd_tests::tool_exists("script") {
        let line = format!("{} info --no-content '{uri}'", nbd_binary().display());
        let out = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .output()
            .expect("script runs");
        assert!(text(&out.stdout).contains("\x1b[1;30mexport="), "{out:?}");
    }
    // Piped, or asked not to, or JSON: no escapes.
    for args in [
        &[][..],
        &["--color", "--no-color"][..],
        &["--color", "--json"][..],
    ] {
        let mut with_uri = args.to_vec();
        with_uri.push(&uri);
        assert!(!nbd_info(&with_uri).contains('\x1b'), "{args:?}");
    }
}

#[test]
fn uri_prints_the_uri_and_json_quotes_it() {
    // nbdinfo 1.14 has no --uri; it prints the URI its report shows.
    let server = NbdkitBuilder::memory(MIB).export_name("named").start();
    let uri = server.uri_for("named");
    assert_eq!(nbd_info(&["--uri", &uri]), format!("{uri}\n"));
    let json = nbd_info(&["--uri", "--json", &uri]);
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("a JSON string");
    assert_eq!(parsed, uri.as_str());
    let report = nbd_info(&["--json", &uri]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["exports"][0]["uri"], uri.as_str());
    // A server program has no URI.
    let out = run_nbd(["info", "--uri", "--", "[", "nbdkit", "memory", "1M", "]"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no URI"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn extended_headers_and_block_sizes_are_shown_as_the_newest_nbdinfo_shows_them() {
    let nbdkit = NbdkitBuilder::memory(MIB)
        .filter("blocksize-policy")
        .param("blocksize-preferred", "4K")
        .param("blocksize-maximum", "32M")
        .start();
    let qemu = QemuNbdBuilder::raw(MIB).shared(4).start();
    // nbdkit 1.32 has no extended headers, qemu-nbd 8.2 on has.
    for (server, extended) in [(&nbdkit, false), (&qemu, true)] {
        let uri = server.uri();
        let json: serde_json::Value =
            serde_json::from_str(&nbd_info(&["--json", &uri])).expect("JSON");
        assert_eq!(json["extended"], extended, "{uri}");
        let text = nbd_info(&["--no-content", &uri]);
        let packets = if extended { "extended" } else { "structured" };
        assert!(
            text.starts_with(&format!(
                "protocol: newstyle-fixed without TLS, using {packets} packets\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("\tblock_size_preferred: 4096 (4K)\n"),
            "{text}"
        );
        assert!(
            text.contains("\tblock_size_maximum: 33554432 (32M)\n"),
            "{text}"
        );
    }
}

#[test]
fn verbose_and_libnbd_debug_print_the_protocol_trace_to_stderr() {
    let server = NbdkitBuilder::memory(MIB).start();
    let uri = server.uri();
    let run = |args: &[&str], debug: Option<&str>| -> Output {
        let mut command = Command::new(nbd_binary());
        command.args(args).env_remove("LIBNBD_DEBUG");
        if let Some(value) = debug {
            command.env("LIBNBD_DEBUG", value);
        }
        command.output().expect("nbd runs")
    };
    let quiet = run(&["info", "--size", &uri], None);
    assert_eq!(text(&quiet.stdout), format!("{MIB}\n"));
    assert!(quiet.stderr.is_empty(), "{}", text(&quiet.stderr));
    assert!(run(&["info", "--size", &uri], Some("0")).stderr.is_empty());
    for (args, debug) in [
        (&["info", "--size", &uri][..], Some("1")),
        (&["-v", "info", "--size", &uri][..], None),
        (&["info", "--verbose", "--size", &uri][..], None),
    ] {
        let out = run(args, debug);
        assert!(out.status.success(), "{args:?}");
        // The report is untouched; the trace is on stderr, every line marked.
        assert_eq!(text(&out.stdout), format!("{MIB}\n"), "{args:?}");
        let trace = text(&out.stderr);
        assert!(
            trace.lines().all(|l| l.starts_with("nbd: debug: ")),
            "{trace}"
        );
        for needle in [
            "recv greeting: newstyle",
            "send option NBD_OPT_GO",
            "recv option reply NBD_REP_ACK (0x1) to NBD_OPT_GO",
            "state: transmission",
            "send command NBD_CMD_DISC",
            "state: closed",
        ] {
            assert!(
                trace.contains(needle),
                "{args:?}: no {needle:?} in\n{trace}"
            );
        }
    }
}
