//! `schema.graphql` is generated from code: this test rewrites it and fails when it was stale
//! (after rust-analyzer's `ensure_file_contents`), and checks every element is described.

use std::path::Path;

#[test]
fn schema_graphql_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let generated = smd_gateway::graphql::sdl();
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != generated {
        std::fs::write(&path, &generated).unwrap();
        panic!("schema.graphql was stale and has been rewritten; review and commit it");
    }
}

#[test]
fn every_type_field_and_argument_has_a_description() {
    let sdl = smd_gateway::graphql::sdl();
    let mut undescribed = Vec::new();
    let lines: Vec<&str> = sdl.lines().collect();
    for (index, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        let declares = trimmed.starts_with("type ")
            || trimmed.starts_with("enum ")
            || trimmed.starts_with("input ")
            || trimmed.starts_with("scalar ")
            || (line.starts_with('\t') || line.starts_with("  "))
                && (trimmed.contains(':')
                    || trimmed.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        if !declares
            || trimmed.is_empty()
            || trimmed.starts_with('"')
            || trimmed.starts_with('#')
            || trimmed == "}"
            || trimmed.starts_with(')')
            || [
                "query: Query",
                "mutation: Mutation",
                "subscription: Subscription",
            ]
            .contains(&trimmed)
        {
            continue;
        }
        let previous = index.checked_sub(1).map(|i| lines[i].trim()).unwrap_or("");
        if !(previous.ends_with("\"\"\"") || previous.ends_with('"')) {
            undescribed.push(trimmed.to_owned());
        }
    }
    assert!(
        undescribed.is_empty(),
        "add a description (///) to: {undescribed:#?}"
    );
}
