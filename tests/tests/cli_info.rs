//! `nbd info`'s options against real servers, each compared with what
//! libnbd's `nbdinfo` answers on the same server: the yes/no questions and
//! their negations, `-L`, `--size --json`, usage errors, and the message for
//! an export the server does not have.

use std::process::{Command, Output};

use nbd_tests::testkit::{nbd_binary, run_nbd};
use nbd_tests::{require_tool, NbdServerBuilder, NbdkitBuilder, QemuNbdBuilder};

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
        for options in [&[][..], &["--size"][..], &["--can", "read"][..]] {
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
