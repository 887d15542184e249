//! Per-resource WebSocket policy: is an upgrade allowed here at all?

use crate::config::Resource;
use crate::handshake::Reject;

/// Whether `res` lets a WebSocket upgrade on `path` through.
pub fn check(res: &Resource, path: &str) -> Result<(), Reject> {
    if !res.websocket.enabled {
        return Err(Reject::WebSocketDisabled);
    }
    if !res.path_allowed(path) {
        return Err(Reject::PathNotAllowed);
    }
    Ok(())
}
