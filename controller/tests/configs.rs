//! Every example config in `configs/controller*.yaml` parses and validates.

use std::path::PathBuf;

use skymesh_controller::config::Config;

#[test]
fn every_example_controller_config_is_valid() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("configs dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("controller") && (name.ends_with(".yaml") || name.ends_with(".yml")) {
            let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            config
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 1,
        "no controller configs found in {}",
        dir.display()
    );
}

#[test]
fn a_config_error_names_the_file_and_the_field() {
    let e = Config::from_yaml(
        "overlay:\n  ipv4: 10.0.0.0/8\n  ipv5: x\n",
        "bad.yaml".as_ref(),
    )
    .expect_err("unknown field");
    let text = e.to_string();
    assert!(text.contains("bad.yaml") && text.contains("ipv5"), "{text}");
    let e = Config::from_yaml("mtu: lots\n", "bad.yaml".as_ref()).expect_err("bad type");
    assert!(e.to_string().contains("mtu"), "{e}");
}

#[test]
fn the_main_example_config_shows_the_defaults() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/controller.yaml");
    let config = Config::load(&path).expect("parses");
    assert_eq!(
        Config {
            data_dir: Config::default().data_dir,
            ..config
        },
        Config::default(),
        "configs/controller.yaml says it shows the defaults (data_dir aside)"
    );
}
