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
