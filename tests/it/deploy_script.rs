//! The README tour and `deploy/cluster-local.sh`. The tour pastes as it is (ids kept in shell variables).
//! The script runs the binary in `$CARGO_TARGET_DIR`, and only `build` (or a missing
//! binary) runs cargo: `start` and `restart` never rebuild one that exists, however old.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::cluster_harness::free_port;

/// A base port whose next three ports (the nodes') are free now.
fn free_base_port() -> u16 {
    loop {
        let base = free_port() - 1;
        let free = (1..=3).all(|n| std::net::TcpListener::bind(("127.0.0.1", base + n)).is_ok());
        if free {
            return base;
        }
    }
}

struct Script {
    dir: tempfile::TempDir,
    base_port: u16,
}

impl Script {
    fn cargo_calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cargo-calls")).unwrap_or_default()
    }

    fn target_dir(&self) -> PathBuf {
        self.dir.path().join("target")
    }

    /// `deploy/cluster-local.sh --dir … --base-port … ARGS` with `CARGO_TARGET_DIR` set and a `cargo`
    /// on the PATH that records its arguments and fails.
    fn run(&self, args: &[&str]) -> Output {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new(repo.join("deploy/cluster-local.sh"))
            .arg("--dir")
            .arg(self.dir.path().join("cluster"))
            .arg("--base-port")
            .arg(self.base_port.to_string())
            .args(args)
            .env("CARGO_TARGET_DIR", self.target_dir())
            .env("PATH", path)
            .env("RUST_LOG", "warn")
            .env_remove("SHOPKEEP_BIN")
            .output()
            .expect("run cluster-local.sh")
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn cluster_local_runs_the_binary_in_cargo_target_dir_and_never_rebuilds_it_on_start_or_restart()
 {
    let script = Script {
        dir: tempfile::tempdir().expect("temp dir"),
        base_port: free_base_port(),
    };
    let bin_dir = script.dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    let calls = script.dir.path().join("cargo-calls");
    let cargo = bin_dir.join("cargo");
    std::fs::write(
        &cargo,
        format!("#!/bin/sh\necho \"$@\" >> '{}'\nexit 1\n", calls.display()),
    )
    .expect("cargo shim");
    let release = script.target_dir().join("release");
    std::fs::create_dir_all(&release).expect("release dir");
    std::fs::copy(env!("CARGO_BIN_EXE_shopkeep"), release.join("shopkeep")).expect("binary");
    // Older than every source file.
    let touched = Command::new("touch")
        .args(["-d", "2000-01-01"])
        .arg(release.join("shopkeep"))
        .arg(&cargo)
        .status()
        .expect("touch");
    assert!(touched.success());
    Command::new("chmod")
        .arg("+x")
        .arg(&cargo)
        .status()
        .expect("chmod");

    let outcome = tokio::task::spawn_blocking(move || {
        let started = script.run(&["--timeout", "60", "start"]);
        let restarted = script.run(&["--timeout", "60", "restart", "2"]);
        let stopped = script.run(&["stop"]);
        let calls_before_build = script.cargo_calls();
        let built = script.run(&["build"]);
        (
            started,
            restarted,
            stopped,
            calls_before_build,
            built,
            script,
        )
    })
    .await
    .expect("script thread");
    let (started, restarted, stopped, calls_before_build, built, script) = outcome;
    assert!(
        started.status.success(),
        "start failed:\n{}",
        text(&started)
    );
    assert!(
        text(&started).contains("older than the sources"),
        "start does not say the binary is old:\n{}",
        text(&started)
    );
    assert!(
        restarted.status.success(),
        "restart failed:\n{}",
        text(&restarted)
    );
    assert!(stopped.status.success(), "stop failed:\n{}", text(&stopped));
    assert_eq!(calls_before_build, "", "start or restart ran cargo");
    assert!(
        !built.status.success(),
        "the cargo shim fails, so must build"
    );
    assert_eq!(
        script.cargo_calls().trim(),
        "build --release",
        "{}",
        text(&built)
    );
}

/// The `sh` blocks of the README's section `heading`, in order.
fn readme_blocks(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme.find(heading).expect("the section");
    let section = &readme[start + heading.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .split("```sh\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("\n```").map(|(block, _)| block.to_owned()))
        .collect()
}

#[tokio::test]
async fn the_readme_tour_pastes_as_it_is_against_a_server_started_with_its_tokens() {
    let srv = crate::harness::Server::start().await;
    let blocks = readme_blocks("## A 5-minute tour");
    assert!(
        blocks.len() >= 2,
        "the tour has a server block and a client block"
    );
    let tour = blocks[1].replace("S=http://127.0.0.1:8080", &format!("S={}", srv.base));
    assert_ne!(
        tour, blocks[1],
        "the tour no longer sets S to the default address"
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg("-c")
            .arg(&tour)
            .env("SHOPKEEP_ADMIN_TOKEN", crate::harness::ADMIN_TOKEN)
            .env("SHOPKEEP_SERVICE_TOKEN", crate::harness::SERVICE_TOKEN)
            .output()
            .expect("bash")
    })
    .await
    .expect("tour thread");
    let out = text(&output);
    assert!(output.status.success(), "the tour failed:\n{out}");
    assert!(
        !out.contains("\"error\""),
        "a step of the tour was refused:\n{out}"
    );
    assert!(
        out.to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "the completion was not replayed:\n{out}"
    );
    // Bought 7.96 of 20.00, then one gem pack (0.99) refunded.
    let wallet = srv.wallet("player-42").await;
    assert_eq!((wallet.balance, wallet.held), (1303, 0), "{out}");
}
