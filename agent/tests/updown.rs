//! `skymesh-agent up FILE` / `down FILE` in a network namespace: addresses, MTU, link state and
//! routes are present after `up` and gone after `down`; a bad file changes nothing.

mod common;

use common::*;

fn conf(private: &str, peer: &str) -> String {
    format!(
        "[Interface]\nPrivateKey = {private}\nAddress = 10.97.0.1/24, fd77:5::1/64\n\
         ListenPort = 51850\nMTU = 1380\n\n[Peer]\nPublicKey = {peer}\n\
         Endpoint = 198.18.60.2:51851\nAllowedIPs = 10.97.0.2/32, 10.98.0.0/16, fd77:6::/64\n\
         PersistentKeepalive = 25\n"
    )
}

#[test]
fn up_adds_addresses_mtu_and_routes_and_down_removes_them() {
    require(&["ip", "wg"]);
    let ns = Netns::new("u");
    let dir = tmpdir();
    let iface = unique("sm3u");
    let file = dir.path().join(format!("{iface}.conf"));
    let (k, p) = (genkey(), genkey());
    std::fs::write(&file, conf(&k.private, &p.public)).expect("write conf");
    let file_s = file.to_str().expect("utf8");

    ns.exec_ok(&[AGENT, "up", file_s]);
    let link = ns.ip(&["link", "show", "dev", &iface]);
    assert!(link.contains("mtu 1380") && link.contains(",UP"), "{link}");
    let addrs = ns.ip(&["addr", "show", "dev", &iface]);
    assert!(addrs.contains("inet 10.97.0.1/24"), "{addrs}");
    assert!(addrs.contains("inet6 fd77:5::1/64"), "{addrs}");
    let r4 = ns.ip(&["-4", "route", "show", "dev", &iface]);
    assert!(r4.contains("10.97.0.2 proto static scope link"), "{r4}");
    assert!(r4.contains("10.98.0.0/16 proto static scope link"), "{r4}");
    let r6 = ns.ip(&["-6", "route", "show", "dev", &iface]);
    assert!(r6.contains("fd77:6::/64 proto static"), "{r6}");
    // The device got the keys and peer over the UAPI.
    let show = ns.exec_ok(&["wg", "showconf", &iface]);
    assert!(
        show.contains(&p.public) && show.contains("ListenPort = 51850"),
        "{show}"
    );
    assert!(show.contains("PersistentKeepalive = 25"), "{show}");
    // What `up` recorded is exactly what it added.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/skymesh/{iface}.state.json")).expect("state"),
    )
    .expect("json");
    assert_eq!(
        state["addresses"],
        serde_json::json!(["10.97.0.1/24", "fd77:5::1/64"])
    );
    assert_eq!(
        state["routes"],
        serde_json::json!(["10.97.0.2/32", "10.98.0.0/16", "fd77:6::/64"])
    );
    // A second `up` refuses rather than stacking a second device.
    let again = ns.exec(&[AGENT, "up", file_s]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    ns.exec_ok(&[AGENT, "down", file_s]);
    let links = ns.ip(&["link", "show"]);
    assert!(!links.contains(&iface), "interface gone: {links}");
    assert!(
        ns.ip(&["route", "show"]).trim().is_empty(),
        "no routes left"
    );
    assert!(
        !ns.ip(&["-6", "route", "show"]).contains("fd77"),
        "no v6 routes left"
    );
    assert!(!socket_path(&iface).exists());
    assert!(!std::path::Path::new(&format!("/run/skymesh/{iface}.state.json")).exists());
    assert!(!std::path::Path::new(&format!("/run/skymesh/{iface}.log")).exists());
    // `down` twice is an error, not a silent success.
    assert!(!ns.exec(&[AGENT, "down", file_s]).status.success());
}

#[test]
fn up_with_a_bad_file_reports_the_line_and_creates_nothing() {
    require(&["ip", "wg"]);
    let ns = Netns::new("v");
    let dir = tmpdir();
    let iface = unique("sm3v");
    let file = dir.path().join(format!("{iface}.conf"));
    let k = genkey();
    std::fs::write(
        &file,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.97.0.1/99\n",
            k.private
        ),
    )
    .expect("write conf");
    let out = ns.exec(&[AGENT, "up", file.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3"), "{err}");
    assert!(!ns.ip(&["link", "show"]).contains(&iface));
    assert!(!socket_path(&iface).exists());
}
