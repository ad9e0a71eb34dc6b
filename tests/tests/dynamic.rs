//! Dynamic plugins: a `ragar` built without backend features runs the
//! backends from their cdylibs; broken libraries are reported together, one
//! paragraph each; a panic inside a plugin becomes an error, not an abort.

use ragar_tests::*;
use std::process::Command;

#[test]
fn minimal_binary_runs_backends_from_their_cdylibs() {
    cache();
    let bin = ragar_minimal();
    let o = run(Command::new(&bin).arg("plugins"));
    let listing = text(&o);
    assert!(
        !listing.contains("candle") && !listing.contains(" ort "),
        "built without backends:\n{listing}"
    );

    let dir = tempfile::tempdir().unwrap();
    for (backend, package) in [
        ("candle", "ragar-candle-plugin"),
        ("ort", "ragar-ort-plugin"),
        ("tch", "ragar-tch-plugin"),
    ] {
        let lib = cdylib(package, &[]);
        let out = dir.path().join(format!("{backend}.json"));
        let o = run(minilm_stage(&bin, &out)
            .env("RAGAR_PLUGIN_PATH", &lib)
            .arg(format!("encoder.backend={backend}")));
        assert!(o.status.success(), "{backend} from {}: {}", lib.display(), text(&o));
        let got = read_matrix(&out);
        for (g, w) in got.iter().zip(reference()) {
            assert!(
                cosine(g, &w) >= 0.9999,
                "{backend} (dynamic) differs from the reference"
            );
        }
        let o = run(Command::new(&bin).env("RAGAR_PLUGIN_PATH", &lib).arg("plugins"));
        assert!(
            text(&o).contains(&format!("dynamic ({})", lib.display())),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn load_failures_are_collected_and_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libnothere.so");
    let not_a_library = dir.path().join("libtext.so");
    std::fs::write(&not_a_library, "not an ELF file").unwrap();
    // A real shared library that is not a ragar plugin.
    let foreign = cache().join("lib/onnxruntime/libonnxruntime.so.1.32.0");
    let future = cdylib("ragar-test-misbehaving", &["future-interface"]);

    let paths = std::env::join_paths([&missing, &not_a_library, &foreign, &future]).unwrap();
    let o = run(Command::new(ragar()).env("RAGAR_PLUGIN_PATH", &paths).arg("plugins"));
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    let failures: Vec<&str> = out.lines().filter(|l| l.starts_with("failed to load")).collect();
    assert_eq!(failures.len(), 4, "{out}");
    assert!(
        failures[0].contains("libnothere.so") && failures[0].contains("does not exist"),
        "{out}"
    );
    assert!(
        failures[1].contains("libtext.so") && failures[1].contains("cannot be opened"),
        "{out}"
    );
    assert!(failures[2].contains("not a ragar plugin"), "{out}");
    assert!(
        failures[3].contains("interface 2") && failures[3].contains("implements 1"),
        "{out}"
    );
    assert!(
        failures.iter().all(|l| l.len() < 600),
        "each cause is one short paragraph:\n{out}"
    );
    // The static components are still listed.
    assert!(out.contains("minilm"), "{out}");
}

#[test]
fn a_panicking_plugin_is_an_error_not_an_abort() {
    let lib = cdylib("ragar-test-misbehaving", &[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.yaml");
    std::fs::write(
        &cfg,
        format!(
            "plugins: [{}]\nencoder:\n  name: panic\n  backend: test\n",
            lib.display()
        ),
    )
    .unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\n").unwrap();
    let o = run(Command::new(ragar())
        .args(["stage", "encoder", "--config"])
        .arg(&cfg)
        .arg("--text-file")
        .arg(&input)
        .arg("--out")
        .arg(dir.path().join("out.json")));
    let out = text(&o);
    // An abort would be a signal (no exit code); an error exits 1.
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("plugin panicked: deliberate panic inside a plugin"),
        "{out}"
    );
    assert!(!dir.path().join("out.json").exists());
}
