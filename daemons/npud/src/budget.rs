//! The memory budget's decisions, without I/O: which loaded models give
//! way to a load, and which the keep-alive unloads. `runtime.rs` applies
//! them to what it holds.

/// A loaded model, as the budget sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub name: String,
    /// Its footprint: weights and KV cache.
    pub bytes: u64,
    /// Running or about to run: never unloaded.
    pub busy: bool,
    /// Milliseconds since it last ran.
    pub idle_ms: u64,
}

/// Why a load cannot fit: the bytes that would be free at best.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    pub free: u64,
}

/// What must be unloaded, least recently used first, for `name` to take
/// `needed` bytes of `budget`. Only models that are idle, and not `name`
/// itself (a reload on another provider), give way; when even all of them
/// are not enough, nothing is unloaded.
pub fn make_room(
    held: &[Held],
    name: &str,
    needed: u64,
    budget: u64,
) -> Result<Vec<String>, NoRoom> {
    let mut used: u64 = held.iter().map(|h| h.bytes).sum();
    if needed > budget {
        return Err(NoRoom {
            free: budget.saturating_sub(used),
        });
    }
    let mut candidates: Vec<&Held> = held.iter().filter(|h| !h.busy && h.name != name).collect();
    // Longest idle last, so that `pop` takes it first.
    candidates.sort_by_key(|h| h.idle_ms);
    let mut victims = Vec::new();
    while used.saturating_add(needed) > budget {
        match candidates.pop() {
            Some(h) => {
                used -= h.bytes;
                victims.push(h.name.clone());
            }
            None => {
                return Err(NoRoom {
                    free: budget.saturating_sub(used),
                })
            }
        }
    }
    Ok(victims)
}

/// The models idle for at least `keep_ms` and not busy.
pub fn idle_past(held: &[Held], keep_ms: u64) -> Vec<String> {
    held.iter()
        .filter(|h| !h.busy && h.idle_ms >= keep_ms)
        .map(|h| h.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(name: &str, bytes: u64, busy: bool, idle_ms: u64) -> Held {
        Held {
            name: name.into(),
            bytes,
            busy,
            idle_ms,
        }
    }

    #[test]
    fn a_load_that_fits_unloads_nothing() {
        let h = [held("a", 30, false, 10)];
        assert_eq!(make_room(&h, "b", 70, 100), Ok(vec![]));
    }

    #[test]
    fn the_longest_idle_models_give_way_first_and_only_as_many_as_needed() {
        let h = [
            held("recent", 30, false, 10),
            held("old", 30, false, 5_000),
            held("older", 30, false, 9_000),
        ];
        assert_eq!(make_room(&h, "new", 40, 100), Ok(vec!["older".into()]));
        assert_eq!(
            make_room(&h, "new", 70, 100),
            Ok(vec!["older".into(), "old".into()])
        );
    }

    #[test]
    fn busy_models_and_the_model_itself_never_give_way() {
        let h = [
            held("running", 50, true, 60_000),
            held("self", 30, false, 60_000),
            held("idle", 10, false, 1),
        ];
        // Room for 20 at best (100 - 50 running - 30 itself).
        assert_eq!(make_room(&h, "self", 30, 100), Err(NoRoom { free: 20 }));
        assert_eq!(make_room(&h, "self", 20, 100), Ok(vec!["idle".into()]));
    }

    #[test]
    fn a_load_larger_than_the_budget_is_refused_at_once() {
        let h = [held("a", 30, false, 1)];
        assert_eq!(make_room(&h, "huge", 101, 100), Err(NoRoom { free: 70 }));
    }

    #[test]
    fn the_keep_alive_spares_busy_and_recent_models() {
        let h = [
            held("busy", 1, true, 99_000),
            held("recent", 1, false, 1_000),
            held("stale", 1, false, 60_000),
        ];
        assert_eq!(idle_past(&h, 30_000), vec!["stale".to_string()]);
    }
}
