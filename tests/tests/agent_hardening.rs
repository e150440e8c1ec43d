//! The agent's reliability with real processes (needs root; without it, it fails with
//! "needs root: ..."): a second agent on one pin path is refused and the first keeps
//! serving; an instance that never becomes ready is replaced after its startup deadline.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use redirector_tests::coldstart::{hello_bin, is_root, redirector_bin, Config, Env, Scale, Svc};

macro_rules! require_root {
    () => {
        if !is_root() {
            panic!("needs root: node and client namespaces and the agent (run as root)");
        }
    };
}

const LONG: Duration = Duration::from_secs(30);

#[test]
fn second_agent_on_one_pin_path_is_refused_and_the_first_keeps_serving() {
    require_root!();
    let svc = Svc::new("locked", "10.96.0.41", Scale::hello(&[]));
    let mut env = Env::start("lk", &Config::one(svc.clone())).unwrap();
    assert_eq!(env.get(svc.addr(), "/", LONG).unwrap().status, 200);

    let mut second = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", env.node))
        .arg(redirector_bin())
        .arg("agent")
        .arg("--config")
        .arg(&env.config_path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second agent is still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("another agent is running on pin path"),
        "{err}"
    );
    // The first one is untouched: alive, its instance and VIP serving.
    assert!(env.agent_alive(), "{}", env.log());
    for _ in 0..5 {
        let r = env.get(svc.addr(), "/", LONG).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(env.running_instances().len(), 1);
}

#[test]
fn instance_never_ready_is_replaced_after_its_startup_deadline() {
    require_root!();
    let dir = std::env::temp_dir().join(format!("rdstuck{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("started-once");
    let _ = std::fs::remove_file(&marker);
    // The first instance never listens; the second is the hello app.
    let script = format!(
        "if [ -e {m} ]; then exec {hello}; fi; touch {m}; exec sleep 600",
        m = marker.display(),
        hello = hello_bin().display()
    );
    let mut scale = Scale::of("/bin/sh".into(), &[]);
    scale.args = vec!["-c".into(), script];
    scale.startup_timeout_secs = Some(1.0);
    let svc = Svc::new("stuck", "10.96.0.42", scale);
    let env = Env::start("sk", &Config::one(svc.clone())).unwrap();
    // Held by the activator through the first instance's deadline and the replacement.
    let r = env.get(svc.addr(), "/", LONG).unwrap();
    assert_eq!(r.status, 200, "{r:?}\n{}", env.log());
    assert!(marker.exists());
    let st = env.status().unwrap();
    let restarts = st["scalers"][svc.full_name()]["restarts"].as_u64().unwrap();
    assert!(restarts >= 1, "{st}");
    assert!(env.log().contains("startup deadline"), "{}", env.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reload_refuses_what_check_refuses_and_keeps_serving() {
    require_root!();
    let svc = Svc::new("kept", "10.96.0.43", Scale::hello(&[]));
    let cfg = Config::one(svc.clone());
    let env = Env::start("rl", &cfg).unwrap();
    assert_eq!(env.get(svc.addr(), "/", LONG).unwrap().status, 200);
    let good = cfg.to_toml(&env.pin_path);
    let service = |name: &str, vip: &str, port: u16| {
        format!("\n[[service]]\nname = \"{name}\"\nnamespace = \"rt\"\nvip = \"{vip}\"\nport = {port}\nbackends = [\"10.244.2.1:80\"]\n")
    };
    for (bad, field) in [
        (
            format!("{good}{}", service("kept", "10.96.0.44", 80)),
            "(kept).name: rt/kept is also service[0]",
        ),
        (
            format!("{good}{}", service("zero", "10.96.0.44", 0)),
            "(zero).port: must not be 0",
        ),
        (
            format!("{good}{}", service("loop", "10.96.0.44", 80))
                .replace("10.244.2.1:80", "10.96.0.44:80"),
            "(loop).backends: 10.96.0.44:80 is one of the service's own VIPs",
        ),
    ] {
        env.write_config(&bad).unwrap();
        let log = redirector_tests::coldstart::wait_for(
            &format!("reload refusing {field}"),
            LONG,
            || {
                let log = env.log();
                log.lines()
                    .any(|l| l.contains("bad config") && l.contains(field))
                    .then_some(log)
            },
        )
        .unwrap();
        assert!(log.contains("agent.toml:"), "{log}");
        let out = Command::new(redirector_bin())
            .args(["check", "--config"])
            .arg(&env.config_path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(field), "{err}");
        assert!(!err.contains(":1:1:"), "{err}");
        // The running state is what it was.
        assert_eq!(env.get(svc.addr(), "/", LONG).unwrap().status, 200);
    }
}
