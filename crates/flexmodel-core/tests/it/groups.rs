//! Hook groups: which sites fire under each selection. (FlexModel's Python groups register
//! nothing from a pattern and raise on re-enabling; each case here is a regression test.)

use flexmodel_core::{Error, FlexModel, Groups, HookFunction, Input};

use crate::toy::{Toy, ids};

/// Sites with a capture after one forward pass with `groups`.
fn fired(fm: &mut FlexModel<Toy>, groups: &Groups) -> Vec<String> {
    fm.clear_output();
    fm.forward_groups(&Input::new(ids()), groups).unwrap();
    fm.output()
        .iter()
        .map(|(name, _)| name.to_string())
        .collect()
}

fn wrapped() -> FlexModel<Toy> {
    let mut fm = FlexModel::new(Toy::new());
    // A group from a pattern: both sites it matches get the hook.
    fm.register(HookFunction::new("*e").group("ends_with_e"))
        .unwrap();
    fm.register(HookFunction::new("double").group("middle"))
        .unwrap();
    fm
}

#[test]
fn group_from_pattern_registers_every_match() {
    let mut fm = wrapped();
    assert_eq!(
        fired(&mut fm, &Groups::only(["ends_with_e"])),
        ["double", "square"]
    );
}

#[test]
fn forward_with_only_some_groups() {
    let mut fm = wrapped();
    fm.register(HookFunction::new("embed")).unwrap(); // in no group
    assert_eq!(fired(&mut fm, &Groups::only(["middle"])), ["double"]);
    assert_eq!(fired(&mut fm, &Groups::All), ["double", "embed", "square"]);
}

#[test]
fn forward_with_the_complement() {
    let mut fm = wrapped();
    fm.register(HookFunction::new("embed")).unwrap();
    assert_eq!(
        fired(&mut fm, &Groups::except(["ends_with_e"])),
        ["double", "embed"]
    );
    assert_eq!(
        fired(&mut fm, &Groups::except(["ends_with_e", "middle"])),
        ["embed"]
    );
}

#[test]
fn every_hook_runs_again_after_a_grouped_forward() {
    let mut fm = wrapped();
    assert_eq!(fired(&mut fm, &Groups::only(["middle"])), ["double"]);
    fm.clear_output();
    fm.forward(&ids()).unwrap();
    let all: Vec<String> = fm.output().iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(all, ["double", "square"]);
    // `double` has two hooks (both groups): two captures per pass.
    assert_eq!(fm.output().get("double").unwrap().len(), 2);
}

#[test]
fn adding_removing_and_deleting_groups() {
    let mut fm = wrapped();
    let h = fm.register(HookFunction::new("embed")).unwrap();
    fm.create_group("empty");
    assert_eq!(
        fired(&mut fm, &Groups::only(["empty"])),
        Vec::<String>::new()
    );
    fm.add_to_group("empty", h).unwrap();
    assert_eq!(fired(&mut fm, &Groups::only(["empty"])), ["embed"]);
    fm.remove_from_group("empty", h).unwrap();
    assert_eq!(
        fired(&mut fm, &Groups::only(["empty"])),
        Vec::<String>::new()
    );
    assert_eq!(fm.groups(), ["empty", "ends_with_e", "middle"]);
    // Removing a group unregisters its hooks.
    assert_eq!(fm.remove_group("ends_with_e").unwrap(), 1);
    assert_eq!(fired(&mut fm, &Groups::All), ["double", "embed"]);
    // Removing a hook takes it out of its groups.
    let middle = fm.group("middle").unwrap();
    fm.remove(middle[0]).unwrap();
    assert!(fm.group("middle").unwrap().is_empty());
    assert_eq!(fired(&mut fm, &Groups::All), ["embed"]);
}

#[test]
fn unknown_group_is_an_error() {
    let mut fm = wrapped();
    let err = fm
        .forward_groups(&Input::new(ids()), &Groups::only(["midle"]))
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownGroup { groups, .. } if groups == &["ends_with_e", "middle"]),
        "{err}"
    );
    assert!(fm.remove_group("nope").is_err());
}
