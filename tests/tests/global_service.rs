//! A global service (`--mode global`) follows its nodes: one task on each of two nodes, a
//! task on a third node once it joins, none on a drained node (and none added elsewhere), and
//! the node's task back, under the same name, once it is active again. `service ls` shows
//! MODE global and running/nodes, `inspect` Docker's `Mode: {Global: {}}`, and `service
//! scale` is refused with Docker's message. Needs root.

use overlay_e2e::{require_root, unique, wait_for, Node, Underlay};
use std::collections::BTreeMap;
use std::time::Duration;

/// The current tasks of `web`, by node (from `service ps`: rows whose desired state is
/// Running; past tasks are the `\_` rows).
fn tasks_by_node(n: &Node) -> BTreeMap<String, Vec<String>> {
    let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in n.ctl_ok(&["service", "ps", "web"]).lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() > 3 && cols[1].starts_with("web.") && cols[3] == "Running" {
            by_node
                .entry(cols[2].to_string())
                .or_default()
                .push(cols[1].to_string());
        }
    }
    by_node
}

/// `web`'s MODE and REPLICAS columns in `service ls`.
fn ls_row(n: &Node) -> (String, String) {
    let ls = n.ctl_ok(&["service", "ls"]);
    let row = ls
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("web"))
        .unwrap_or_else(|| panic!("web not listed:\n{ls}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    (cols[2].to_string(), cols[3].to_string())
}

#[test]
fn global_service_follows_joins_drains_and_activations() {
    if !require_root("global_service_follows_joins_drains_and_activations") {
        return;
    }
    let tag = unique("gl");
    let u = Underlay::new(&tag, 3, 41);
    let (n1, n2) = Node::pair(&tag, &u);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.141.0/24", "app"]);
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "web", "--mode", "global", "--network", "app",
        "--", "sleep", "infinity"]);
    n1.wait_running("web", 2);
    let two = tasks_by_node(&n1);
    assert_eq!(
        two.keys().collect::<Vec<_>>(),
        [&n1.name, &n2.name],
        "one task per node: {two:?}"
    );
    assert!(two.values().all(|t| t.len() == 1), "{two:?}");
    let on_n2 = two[&n2.name][0].clone();
    let v = n1.json(&["service", "inspect", "web"]);
    assert_eq!(v[0]["Spec"]["Mode"], serde_json::json!({"Global": {}}));
    assert_eq!(ls_row(&n1), ("global".into(), "2/2".into()));
    let err = n1.ctl_err(&["service", "scale", "web=3"]);
    assert!(
        err.contains("scale can only be used with replicated or replicated-job mode"),
        "{err}"
    );

    // A third node joins: the manager's healing tick gives it a task.
    let n3 = Node::worker(&format!("{tag}c"), &u, 3, &n1);
    n1.wait_ready(&[&n3]);
    n1.wait_running("web", 3);
    let three = tasks_by_node(&n1);
    assert_eq!(three.len(), 3, "{three:?}");
    assert!(three.contains_key(&n3.name), "{three:?}");
    assert_eq!(ls_row(&n1), ("global".into(), "3/3".into()));

    // Drained: n2's task goes, and none is added elsewhere.
    n1.ctl_ok(&["node", "update", "--availability", "drain", &n2.name]);
    let drained = wait_for(Duration::from_secs(15), || {
        let now = tasks_by_node(&n1);
        now.len() == 2 && !now.contains_key(&n2.name) && ls_row(&n1).1 == "2/2"
    });
    assert!(
        drained,
        "n2's task did not leave:\n{}",
        n1.ctl_ok(&["service", "ps", "web"])
    );
    let after = tasks_by_node(&n1);
    assert!(after.values().all(|t| t.len() == 1), "{after:?}");
    // Its namespace goes too (the graceful stop ran on n2).
    let gone = wait_for(Duration::from_secs(15), || {
        !n2.task_namespaces().iter().any(|ns| ns.contains("web"))
    });
    assert!(gone, "n2 still runs web: {:?}", n2.task_namespaces());

    // Active again: the task comes back, under the node's name for it.
    n1.ctl_ok(&["node", "update", "--availability", "active", &n2.name]);
    n1.wait_running("web", 3);
    let back = tasks_by_node(&n1);
    assert_eq!(back.get(&n2.name), Some(&vec![on_n2]), "{back:?}");
    assert_eq!(ls_row(&n1), ("global".into(), "3/3".into()));
}
