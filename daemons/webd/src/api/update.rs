//! System updates: state, check, install, rollback.

use super::*;

pub(super) async fn update_state(_r: Reader, State(app): AppState) -> ApiResult<Json<Value>> {
    let u = otad(&app).await?;
    let e = |e| ApiError::from_bus("otad", e);
    let job_path = u.job().await.map_err(e)?;
    let job = if job_path.as_str() == "/" {
        None
    } else {
        events::update_job(&app.bus, &job_path).await
    };
    Ok(Json(json!({
        "booted": u.booted_slot().await.map_err(e)?,
        "primary": u.primary_slot().await.map_err(e)?,
        "version": u.system_version().await.map_err(e)?,
        "operation": u.operation().await.map_err(e)?,
        "health": u.health().await.map_err(e)?,
        "last_error": u.last_error().await.map_err(e)?,
        "status": u.status().await.map_err(e)?,
        "slots": u.slots().await.map_err(e)?,
        "job": job,
    })))
}

pub(super) async fn check_update(_a: Admin, State(app): AppState) -> ApiResult<Json<Value>> {
    let c = otad(&app)
        .await?
        .check()
        .await
        .map_err(|e| ApiError::from_bus("otad", e))?;
    Ok(Json(json!({
        "available": c.available,
        "version": c.version,
        "current_version": c.current_version,
    })))
}

/// Installs what the update server offers, checked again now.
pub(super) async fn install_update(_a: Admin, State(app): AppState) -> ApiResult<Json<Value>> {
    let u = otad(&app).await?;
    let e = |e| ApiError::from_bus("otad", e);
    let c = u.check().await.map_err(e)?;
    if !c.available {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "UpToDate",
            format!("no newer system than {} is offered", c.current_version),
        ));
    }
    let job = u.install(&c.source).await.map_err(e)?;
    tracing::info!("update to {} started from the dashboard", c.version);
    Ok(Json(json!({ "job": job_id(&job) })))
}

pub(super) async fn rollback(_a: Admin, State(app): AppState) -> ApiResult<Json<Value>> {
    let slot = otad(&app)
        .await?
        .rollback()
        .await
        .map_err(|e| ApiError::from_bus("otad", e))?;
    tracing::info!("rolled back from the dashboard: slot {slot} boots next");
    Ok(Json(json!({ "primary": slot })))
}

pub(super) async fn cancel_update_job(
    _a: Admin,
    State(app): AppState,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = job_path(update_bus::JOB_PATH_PREFIX, &id)?;
    cancel_job(&app, update_bus::BUS_NAME, &job, "otad").await?;
    tracing::info!("update job {id} cancelled from the dashboard");
    Ok(Json(json!({})))
}
