//! `transform`: JMESPath filters that reshape a source's result or an
//! aggregation's merged document.
//!
//! A filter runs synchronously on the request's task, so it must end and
//! stay bounded. JMESPath has no loops or recursion, so every filter ends.
//! What it can do is repeat its input (`[@, @] | [@, @] | []`...), which
//! costs pointers (values are shared, not copied), and copy it into text
//! (`to_string`, `join`). Both are bounded at load from the filter's syntax
//! ([`cost`]), so a filter's work and memory are at most a fixed multiple of
//! its input, and its result is turned into JSON under a size budget.

use std::sync::Arc;

use jmespath::{Expression, Variable, ast::Ast};
use serde_json::Value;

/// The most a filter may repeat its input, by [`cost`]: far above what
/// reshaping needs (`orders[].{id: id, sku: sku}` is 2), and repeats are
/// shared values (a pointer each), not copies.
pub const MAX_GROWTH: u64 = 256;
/// The most a filter may copy its input into text (`to_string`, `join`).
pub const MAX_COPIES: u64 = 16;

/// A compiled filter.
#[derive(Clone)]
pub struct Filter {
    expression: Arc<Expression<'static>>,
    /// The filter as written, for errors.
    pub text: Arc<str>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filter({:?})", self.text)
    }
}

impl Filter {
    /// Compiles `text`; a syntax error, or a filter that could repeat its
    /// input more than [`MAX_GROWTH`] times or copy it into text more than
    /// [`MAX_COPIES`] times, is refused.
    pub fn compile(text: &str) -> Result<Self, String> {
        let expression = jmespath::compile(text).map_err(|e| e.to_string())?;
        let Cost { growth, copies } = cost(expression.as_ast());
        if growth > MAX_GROWTH {
            return Err(format!(
                "the filter could make its result up to {growth} times larger than its input \
                 (at most {MAX_GROWTH}): it repeats a value in too many places"
            ));
        }
        if copies == u64::MAX {
            return Err(
                "`join` takes a literal separator (such as `', '`): one made from \
                        the data could be repeated without bound"
                    .into(),
            );
        }
        if copies > MAX_COPIES {
            return Err(format!(
                "the filter could copy its input into text up to {copies} times (at most \
                 {MAX_COPIES}): `to_string` or `join` of values it repeats"
            ));
        }
        Ok(Self {
            expression: Arc::new(expression),
            text: text.into(),
        })
    }

    /// Applies the filter; its JSON result may take at most `max_bytes`
    /// (the value of the key named `limit`).
    pub fn apply(&self, input: &Value, max_bytes: usize, limit: &str) -> Result<Value, String> {
        let data = Variable::try_from(input).map_err(|e| e.to_string())?;
        let result = self.expression.search(data).map_err(|e| e.to_string())?;
        let mut budget = max_bytes;
        to_json(&result, &mut budget)
            .ok_or_else(|| format!("its result would exceed {max_bytes} bytes of JSON ({limit})"))
    }
}

/// What a filter can cost, as multiples of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// How many times larger than its input its result (and the work to make
    /// it) can be.
    pub growth: u64,
    /// How many times its input it can copy into text; `u64::MAX` when
    /// nothing bounds it.
    pub copies: u64,
}

/// The [`Cost`] of a filter, from its syntax. Selecting never grows; a
/// multi-select adds its members; applying one expression to another's
/// result, or to each element of it, multiplies.
pub fn cost(ast: &Ast) -> Cost {
    let mut copies = 0;
    let growth = walk(ast, 1, &mut copies);
    Cost { growth, copies }
}

/// The growth of `ast`, evaluated `times` times over; the text copies it
/// makes are added to `copies`.
fn walk(ast: &Ast, times: u64, copies: &mut u64) -> u64 {
    let sum = |nodes: &mut dyn Iterator<Item = &Ast>, copies: &mut u64| {
        nodes.fold(0u64, |acc, n| acc.saturating_add(walk(n, times, copies)))
    };
    let copy = |n: u64, copies: &mut u64| *copies = copies.saturating_add(n);
    match ast {
        Ast::Identity { .. }
        | Ast::Field { .. }
        | Ast::Index { .. }
        | Ast::Slice { .. }
        | Ast::Literal { .. } => 1,
        Ast::Subexpr { lhs, rhs, .. } | Ast::Projection { lhs, rhs, .. } => {
            let left = walk(lhs, times, copies);
            left.saturating_mul(walk(rhs, times.saturating_mul(left), copies))
        }
        Ast::Flatten { node, .. }
        | Ast::ObjectValues { node, .. }
        | Ast::Not { node, .. }
        | Ast::Expref { ast: node, .. } => walk(node, times, copies),
        // Each side is evaluated once; the result is one of them, or a bool.
        Ast::Comparison { lhs, rhs, .. } | Ast::And { lhs, rhs, .. } | Ast::Or { lhs, rhs, .. } => {
            walk(lhs, times, copies).max(walk(rhs, times, copies))
        }
        Ast::Condition {
            predicate, then, ..
        } => walk(predicate, times, copies).max(walk(then, times, copies)),
        Ast::MultiList { elements, .. } => sum(&mut elements.iter(), copies).max(1),
        Ast::MultiHash { elements, .. } => {
            sum(&mut elements.iter().map(|kv| &kv.value), copies).max(1)
        }
        Ast::Function { name, args, .. } => match (name.as_str(), &args[..]) {
            // `map(&expr, list)` applies the expression to each element.
            ("map", [expr, list]) => {
                let list = walk(list, times, copies);
                list.saturating_mul(walk(expr, times.saturating_mul(list), copies))
            }
            ("to_string", [arg]) => {
                let g = walk(arg, times, copies);
                copy(times.saturating_mul(g), copies);
                g
            }
            // The separator is repeated once per element: only a literal
            // one is bounded by the list's own size.
            ("join", [Ast::Literal { .. }, list]) => {
                let g = walk(list, times, copies);
                copy(times.saturating_mul(g).saturating_mul(2), copies);
                g
            }
            ("join", _) => {
                *copies = u64::MAX;
                1
            }
            _ => sum(&mut args.iter(), copies).max(1),
        },
    }
}

/// A JMESPath value as JSON, each value costing its size in `budget`; `None`
/// once the budget runs out.
fn to_json(var: &Variable, budget: &mut usize) -> Option<Value> {
    fn spend(budget: &mut usize, n: usize) -> Option<()> {
        *budget = budget.checked_sub(n)?;
        Some(())
    }
    Some(match var {
        Variable::Null => {
            spend(budget, 4)?;
            Value::Null
        }
        Variable::Bool(b) => {
            spend(budget, 5)?;
            Value::Bool(*b)
        }
        Variable::Number(n) => {
            spend(budget, 8)?;
            Value::Number(n.clone())
        }
        Variable::String(s) => {
            spend(budget, s.len() + 2)?;
            Value::String(s.clone())
        }
        Variable::Array(items) => {
            spend(budget, 2)?;
            let mut out = Vec::with_capacity(items.len().min(1024));
            for item in items {
                spend(budget, 1)?;
                out.push(to_json(item, budget)?);
            }
            Value::Array(out)
        }
        Variable::Object(fields) => {
            spend(budget, 2)?;
            let mut out = serde_json::Map::new();
            for (key, value) in fields {
                spend(budget, key.len() + 4)?;
                out.insert(key.clone(), to_json(value, budget)?);
            }
            Value::Object(out)
        }
        // Only `&expr` arguments of functions are expression references.
        Variable::Expref(_) => {
            spend(budget, 4)?;
            Value::Null
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reshapes() {
        let f = Filter::compile("{name: name, ids: orders[].id}").unwrap();
        let input = json!({"name": "Ada", "x": 1, "orders": [{"id": 1}, {"id": 2}]});
        assert_eq!(
            f.apply(&input, 1 << 20, "max_response_bytes").unwrap(),
            json!({"name": "Ada", "ids": [1, 2]})
        );
    }

    #[test]
    fn a_filter_that_multiplies_its_input_is_refused_at_load() {
        let doubling = ["[@, @]"; 9].join(" | ");
        let error = Filter::compile(&doubling).unwrap_err();
        assert!(error.contains("512 times"), "{error}");
        // Eight doublings are within the bound; their result is not.
        let f = Filter::compile(&["[@, @]"; 8].join(" | ")).unwrap();
        let big = json!({"text": "x".repeat(10_000)});
        let error = f.apply(&big, 1 << 20, "max_response_bytes").unwrap_err();
        assert!(error.contains("exceed 1048576 bytes"), "{error}");
    }

    #[test]
    fn syntax_errors_are_refused() {
        assert!(Filter::compile("repeat(.)").is_err());
        assert!(Filter::compile("{name: }").is_err());
    }

    #[test]
    fn copies_into_text_are_bounded() {
        let many = ["[@, @]"; 5].join(" | ") + " | [][][][] | [*].to_string(@)";
        let error = Filter::compile(&many).unwrap_err();
        assert!(
            error.contains("copy its input into text up to 32 times"),
            "{error}"
        );
        let error = Filter::compile("join(to_string(@), names)").unwrap_err();
        assert!(error.contains("literal separator"), "{error}");
        Filter::compile("join(', ', names)").unwrap();
        Filter::compile("to_string(@)").unwrap();
    }

    #[test]
    fn growth_of_common_filters_is_small() {
        for (text, expected) in [
            ("name", 1),
            ("{name: name, email: email}", 2),
            ("orders[].{id: id, sku: sku}", 2),
            ("orders[?total > `10`].id", 1),
            ("map(&id, orders)", 1),
        ] {
            let e = jmespath::compile(text).unwrap();
            assert_eq!(cost(e.as_ast()).growth, expected, "{text}");
        }
    }
}
