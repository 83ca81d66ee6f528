//! Power profile and budget.

use super::*;

pub(super) async fn power_state(_r: Reader, State(app): AppState) -> ApiResult<Json<Value>> {
    events::power_state(&app.bus)
        .await
        .map(Json)
        .map_err(|e| ApiError::from_bus("powerd", e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    profile: String,
}

pub(super) async fn set_profile(
    _a: Admin,
    State(app): AppState,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let p: Profile = body(&bytes)?;
    if !["power-saver", "balanced", "performance"].contains(&p.profile.as_str()) {
        return Err(ApiError::bad_request(format!(
            "{:?} is not a profile (power-saver, balanced, performance)",
            p.profile
        )));
    }
    let ppd = power_bus::PowerProfilesProxy::new(&app.bus)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    ppd.set_active_profile(&p.profile)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    tracing::info!("profile set to {} from the dashboard", p.profile);
    let state = events::power_state(&app.bus)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    app.events.send(json!({ "type": "power", "power": state }));
    Ok(Json(state))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Budget {
    watts: f64,
}

pub(super) async fn set_budget(
    _a: Admin,
    State(app): AppState,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: Budget = body(&bytes)?;
    let p1 = power_bus::Power1Proxy::new(&app.bus)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    p1.set_budget(b.watts)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    tracing::info!("power budget set to {} W from the dashboard", b.watts);
    let state = events::power_state(&app.bus)
        .await
        .map_err(|e| ApiError::from_bus("powerd", e))?;
    app.events.send(json!({ "type": "power", "power": state }));
    Ok(Json(state))
}
