//! The Kubernetes manifests and the Dockerfile agree with each other and
//! with the gateway: the ConfigMap's config passes `aggregator check
//! --strict`, ports and probe services are the ones the gateway serves (a
//! gateway runs that config here and answers the probes), the preStop
//! delay is the config's `shutdown_delay`, and termination leaves time for
//! the drain.

mod support;

use std::{collections::HashMap, path::Path, time::Duration};

use aggregator::config::Config;
use support::*;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use yaml_rust2::{Yaml, YamlLoader};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// Every manifest of the directory `dir` (not of its subdirectories), by kind.
fn manifests_in(dir: &str) -> HashMap<String, Yaml> {
    let mut by_kind = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}")) {
            let kind = str_at(&doc, &["kind"]).to_owned();
            assert!(by_kind.insert(kind.clone(), doc).is_none(), "two {kind}s");
        }
    }
    by_kind
}

fn manifests() -> HashMap<String, Yaml> {
    manifests_in(DIR)
}

fn at<'a>(doc: &'a Yaml, path: &[&str]) -> &'a Yaml {
    let node = path.iter().fold(doc, |node, key| &node[*key]);
    assert!(!node.is_badvalue(), "no {}", path.join("."));
    node
}

fn str_at<'a>(doc: &'a Yaml, path: &[&str]) -> &'a str {
    at(doc, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

fn int_at(doc: &Yaml, path: &[&str]) -> i64 {
    at(doc, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{} is not an integer", path.join(".")))
}

/// What a Kustomization lists under `resources`.
fn resources(manifests: &HashMap<String, Yaml>) -> Vec<&str> {
    at(&manifests["Kustomization"], &["resources"])
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect()
}

/// `aggregator check --strict` accepts `config`.
async fn passes_a_strict_check(config: &str) {
    let (path, _dir) = Process::config_file(config);
    let output = Process::run(&["check", "--config", path.to_str().unwrap(), "--strict"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

fn config_text(manifests: &HashMap<String, Yaml>) -> &str {
    str_at(&manifests["ConfigMap"], &["data", "gateway.toml"])
}

fn container(manifests: &HashMap<String, Yaml>) -> &Yaml {
    let containers = at(
        &manifests["Deployment"],
        &["spec", "template", "spec", "containers"],
    );
    &containers[0]
}

fn port_named(container: &Yaml, name: &str) -> i64 {
    let ports = at(container, &["ports"]).as_vec().unwrap();
    let port = ports.iter().find(|p| p["name"].as_str() == Some(name));
    int_at(
        port.unwrap_or_else(|| panic!("no port {name}")),
        &["containerPort"],
    )
}

#[test]
fn every_file_is_in_the_kustomization_and_every_kind_is_there() {
    let manifests = manifests();
    for kind in [
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Kustomization",
    ] {
        assert!(manifests.contains_key(kind), "no {kind}");
    }
    let listed = resources(&manifests);
    for entry in std::fs::read_dir(DIR).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if entry.path().is_dir() {
            // An optional component: offered, commented, in the kustomization.
            let text = std::fs::read_to_string(format!("{DIR}/kustomization.yaml")).unwrap();
            assert!(
                text.lines().any(|l| l.trim() == format!("# - {name}")),
                "{name}/ is not offered in the kustomization"
            );
            continue;
        }
        if name != "kustomization.yaml" {
            assert!(
                listed.contains(&name.as_str()),
                "{name} is not in the kustomization"
            );
        }
    }
}

#[tokio::test]
async fn the_configmap_config_passes_a_strict_check() {
    let manifests = manifests();
    passes_a_strict_check(config_text(&manifests)).await;
}

#[test]
fn the_deployment_matches_the_config_and_the_image() {
    let manifests = manifests();
    let config = Config::parse(config_text(&manifests), "configmap", Path::new(DIR)).unwrap();
    let deployment = &manifests["Deployment"];
    let pod = at(deployment, &["spec", "template", "spec"]);
    let container = container(&manifests);

    assert_eq!(int_at(deployment, &["spec", "replicas"]), 3);
    let grpc_port = i64::from(config.server.listen.port());
    let metrics_port = i64::from(config.server.metrics_listen.expect("metrics_listen").port());
    assert!(
        config.server.listen.ip().is_unspecified(),
        "reachable from outside the pod"
    );
    assert_eq!(port_named(container, "grpc"), grpc_port);
    assert_eq!(port_named(container, "metrics"), metrics_port);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            int_at(container, &[probe, "grpc", "port"]),
            grpc_port,
            "{probe}"
        );
    }
    let annotations = at(deployment, &["spec", "template", "metadata", "annotations"]);
    assert_eq!(str_at(annotations, &["prometheus.io/scrape"]), "true");
    assert_eq!(
        str_at(annotations, &["prometheus.io/port"]),
        metrics_port.to_string()
    );
    assert_eq!(str_at(annotations, &["prometheus.io/path"]), "/metrics");

    // The preStop sleep is the shutdown delay; termination waits for both
    // and for the drain.
    let pre_stop = int_at(container, &["lifecycle", "preStop", "sleep", "seconds"]);
    assert_eq!(pre_stop as u64, config.server.shutdown_delay.as_secs());
    assert!(config.server.shutdown_delay >= Duration::from_secs(1));
    let grace = int_at(pod, &["terminationGracePeriodSeconds"]) as u64;
    let needed = pre_stop as u64
        + config.server.shutdown_delay.as_secs()
        + config.server.drain_timeout.as_secs();
    assert!(
        grace > needed,
        "terminationGracePeriodSeconds {grace} <= {needed}"
    );

    // The config file the binary is told to read is the mounted ConfigMap.
    let args: Vec<&str> = at(container, &["args"])
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let config_arg = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mount = &at(container, &["volumeMounts"]).as_vec().unwrap()[0];
    let volume = &at(pod, &["volumes"]).as_vec().unwrap()[0];
    assert_eq!(str_at(mount, &["name"]), str_at(volume, &["name"]));
    assert_eq!(
        str_at(volume, &["configMap", "name"]),
        str_at(&manifests["ConfigMap"], &["metadata", "name"])
    );
    assert_eq!(
        config_arg,
        format!("{}/gateway.toml", str_at(mount, &["mountPath"]))
    );
    assert!(args.contains(&"--watch"), "ConfigMap updates are reloaded");

    assert_eq!(
        at(container, &["securityContext", "readOnlyRootFilesystem"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        at(pod, &["securityContext", "runAsNonRoot"]).as_bool(),
        Some(true)
    );
    for resource in [
        ["requests", "cpu"],
        ["requests", "memory"],
        ["limits", "memory"],
    ] {
        at(container, &["resources", resource[0], resource[1]]);
    }

    // The image: multi-stage, non-root, the same ports and config path.
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(
        lines.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()),
        "runs as {user}"
    );
    assert_eq!(
        user.split(':').next().unwrap(),
        int_at(pod, &["securityContext", "runAsUser"]).to_string()
    );
    let exposed = lines
        .iter()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    for port in [grpc_port, metrics_port] {
        assert!(
            exposed.split_whitespace().any(|p| p == port.to_string()),
            "EXPOSE {exposed}"
        );
    }
    assert!(
        dockerfile.contains(config_arg),
        "the image's default config path"
    );
}

#[test]
fn the_service_hpa_and_pdb_select_the_deployment() {
    let manifests = manifests();
    let deployment = &manifests["Deployment"];
    let labels = at(deployment, &["spec", "template", "metadata", "labels"]);
    let matches = |selector: &Yaml| {
        let selector = selector.as_hash().unwrap();
        assert!(!selector.is_empty());
        selector
            .iter()
            .all(|(k, v)| labels[k.as_str().unwrap()] == *v)
    };
    assert!(matches(at(
        deployment,
        &["spec", "selector", "matchLabels"]
    )));
    assert!(matches(at(&manifests["Service"], &["spec", "selector"])));
    assert!(matches(at(
        &manifests["PodDisruptionBudget"],
        &["spec", "selector", "matchLabels"]
    )));

    let container = container(&manifests);
    for port in at(&manifests["Service"], &["spec", "ports"])
        .as_vec()
        .unwrap()
    {
        let target = str_at(port, &["targetPort"]);
        assert_eq!(
            int_at(port, &["port"]),
            port_named(container, target),
            "{target}"
        );
    }

    let hpa = &manifests["HorizontalPodAutoscaler"];
    assert_eq!(
        str_at(hpa, &["spec", "scaleTargetRef", "kind"]),
        "Deployment"
    );
    assert_eq!(
        str_at(hpa, &["spec", "scaleTargetRef", "name"]),
        str_at(deployment, &["metadata", "name"])
    );
    let replicas = int_at(deployment, &["spec", "replicas"]);
    assert_eq!(int_at(hpa, &["spec", "minReplicas"]), replicas);
    assert!(int_at(hpa, &["spec", "maxReplicas"]) > replicas);
    // A voluntary disruption never takes more than one replica at once.
    assert_eq!(
        int_at(
            &manifests["PodDisruptionBudget"],
            &["spec", "maxUnavailable"]
        ),
        1
    );
}

#[tokio::test]
async fn the_gateway_running_the_configmap_answers_its_probes() {
    let manifests = manifests();
    let mut config = Config::parse(config_text(&manifests), "configmap", Path::new(DIR)).unwrap();
    // Here, on loopback and free ports; nothing else of the config changes.
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_listen = None;
    let gateway = Gateway::start_config(config).await;
    let mut health = HealthClient::new(gateway.channel().await);
    let container = container(&manifests);
    for probe in ["readinessProbe", "livenessProbe"] {
        let service = str_at(container, &[probe, "grpc", "service"]).to_owned();
        let status = health
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("{probe} service {service:?}: {s:?}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{probe} {service:?}");
    }

    // Once shutdown begins, readiness fails at once, so the pod leaves the
    // endpoints while the shutdown delay keeps it serving.
    gateway.signal_stop();
    let service = str_at(container, &["readinessProbe", "grpc", "service"]).to_owned();
    let mut watch = health
        .watch(HealthCheckRequest { service })
        .await
        .unwrap()
        .into_inner();
    let not_serving = async {
        while let Some(message) = watch.message().await.unwrap() {
            if message.status == ServingStatus::NotServing as i32 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), not_serving)
        .await
        .expect("readiness turns NOT_SERVING");
}

/// The ConfigMap's config with its commented `store` lines put in force.
fn config_with_store(manifests: &HashMap<String, Yaml>) -> String {
    let text = config_text(manifests);
    let mut found = false;
    let config = text
        .lines()
        .map(|line| match line.trim().strip_prefix("# store") {
            Some(rest) => {
                found = true;
                format!("store{rest}")
            }
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(found, "the ConfigMap offers no commented `store`");
    config
}

#[tokio::test]
async fn the_optional_redis_is_the_store_the_configmap_offers() {
    let redis = manifests_in(&format!("{DIR}/redis"));
    let listed = resources(&redis);
    assert_eq!(listed, ["statefulset.yaml", "service.yaml"]);
    let service = &redis["Service"];
    let set = &redis["StatefulSet"];
    let labels = at(set, &["spec", "template", "metadata", "labels"]);
    assert_eq!(at(service, &["spec", "selector"]), labels);
    assert_eq!(at(set, &["spec", "selector", "matchLabels"]), labels);
    let port = &at(service, &["spec", "ports"])[0];
    let container = &at(set, &["spec", "template", "spec", "containers"])[0];
    assert_eq!(port_named(container, str_at(port, &["targetPort"])), 6379);

    let manifests = manifests();
    let config = config_with_store(&manifests);
    let parsed =
        Config::parse(&config, "configmap", Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    let store = parsed.server.store.expect("store in force");
    assert_eq!(
        store,
        format!(
            "redis://{}:{}/0",
            str_at(service, &["metadata", "name"]),
            int_at(port, &["port"])
        ),
        "the store is the Service's address"
    );
    // The whole config, with the store and with the cache too, passes a strict check.
    let config = config.replace("# cache = ", "cache = ");
    passes_a_strict_check(&config).await;
}
