//! Detection inside the consumer thread: every decoded event goes through
//! the detectors right away (an alert must not wait for its batch to be
//! written), each transition is offered to the alert publisher and also
//! stored with the batch, so that the alerts table and the offsets always
//! agree. On assignment the detector state of the new partitions is rebuilt
//! from the stored events and the alerts that were open; on revocation all
//! of it is forgotten (a partition that comes back later may have moved on
//! under another instance, and its open alerts are that instance's now).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::{StreamExt, pin_mut};
use tracing::info;
use uuid::Uuid;

use crate::alerts::publisher::AlertPublisher;
use crate::detect::{AlertState, Detector, OpenEpisode, Severity, Transition};
use crate::event::AuthEvent;
use crate::store::{queries, with_causes};

/// How often the wall-clock housekeeping runs.
const TICK: Duration = Duration::from_secs(1);

pub struct Detection {
    detector: Detector,
    publisher: AlertPublisher,
    /// Whose stored offsets say where each partition's events end.
    group: String,
    topic: String,
    rebuild_window_max: Duration,
    last_tick: Instant,
    scratch: Vec<Transition>,
    /// Whether the open alerts stored without a partition (before
    /// migrations/0008) were picked up since the last reset.
    restored_unpartitioned: bool,
    /// Partitions whose state is loaded since the last reset.
    rebuilt: HashSet<i32>,
}

impl Detection {
    pub fn new(
        detector: Detector,
        publisher: AlertPublisher,
        (group, topic): (&str, &str),
        rebuild_window_max: Duration,
    ) -> Detection {
        Detection {
            detector,
            publisher,
            group: group.to_owned(),
            topic: topic.to_owned(),
            rebuild_window_max,
            last_tick: Instant::now(),
            scratch: Vec::new(),
            restored_unpartitioned: false,
            rebuilt: HashSet::new(),
        }
    }

    /// Runs the detectors on one event; returns the transitions with
    /// whether each was published.
    pub fn observe(&mut self, event: &AuthEvent, partition: i32) -> Vec<(Transition, bool)> {
        self.detector.observe(event, partition, &mut self.scratch);
        self.publish()
    }

    /// Wall-clock housekeeping when due: resolutions of a quiet stream,
    /// storm summaries, eviction.
    pub fn tick_if_due(&mut self) -> Vec<(Transition, bool)> {
        if self.last_tick.elapsed() < TICK {
            return Vec::new();
        }
        self.last_tick = Instant::now();
        self.detector.tick(&mut self.scratch);
        let out = self.publish();
        self.publisher.flush_withheld(chrono::Utc::now().timestamp_micros());
        out
    }

    fn publish(&mut self) -> Vec<(Transition, bool)> {
        if self.scratch.is_empty() {
            return Vec::new();
        }
        let publisher = &mut self.publisher;
        self.scratch
            .drain(..)
            .map(|t| {
                let sent = publisher.offer(&t);
                (t, sent)
            })
            .collect()
    }

    /// Forgets every partition's state (their partitions were revoked).
    pub fn forget_all(&mut self) {
        self.detector.forget_all();
        self.rebuilt.clear();
        self.restored_unpartitioned = false;
    }

    /// Rebuilds state for partitions not loaded yet: their open alerts and
    /// their stored events of the last window, replayed without emitting.
    pub async fn rebuild(&mut self, pool: &Pool, partitions: &[i32]) -> Result<(), String> {
        let fresh: Vec<i32> = partitions.iter().copied().filter(|p| !self.rebuilt.contains(p)).collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let client = pool.get().await.map_err(|e| with_causes(&e))?;
        {
            let unpartitioned = !self.restored_unpartitioned;
            let open =
                client.query(queries::OPEN_ALERTS, &[&fresh, &unpartitioned]).await.map_err(|e| with_causes(&e))?;
            let episodes: Vec<OpenEpisode> = open.iter().filter_map(open_episode).collect();
            info!(open = episodes.len(), partitions = ?fresh, "restored open alerts");
            self.detector.restore(episodes);
            self.restored_unpartitioned = true;
            // Transitions never acknowledged (the process before died with
            // them in flight or held back): again, under the same alert_id.
            let undelivered =
                client.query(queries::UNDELIVERED_ALERTS, &[&fresh]).await.map_err(|e| with_causes(&e))?;
            let resent = undelivered.iter().filter_map(stored_transition).map(|t| self.publisher.resend(&t)).count();
            if resent > 0 {
                info!(resent, partitions = ?fresh, "sent again the alerts Kafka had not acknowledged");
            }
        }
        let span = self.detector.rebuild_span().min(self.rebuild_window_max);
        let windows =
            RebuildWindows::read(&client, (&self.group, &self.topic), Some(&fresh), span, self.rebuild_window_max)
                .await
                .map_err(|e| with_causes(&e))?;
        let (exact, prefixes) = self.detector.relevant_actions();
        let started = Instant::now();
        // The events of each partition reach its detector in offset order
        // live: what was late then is left out again.
        let order = ReplayOrder::EventTime { lateness: self.detector.lateness() };
        let rows = windows.events(&client, &exact, &prefixes, order).await.map_err(|e| with_causes(&e))?;
        pin_mut!(rows);
        self.detector.set_emitting(false);
        let mut n = 0u64;
        let mut discard = Vec::new();
        while let Some(row) = rows.next().await {
            let row = row.map_err(|e| with_causes(&e))?;
            let event = row_to_event(&row);
            self.detector.observe(&event, row.get(10), &mut discard);
            discard.clear();
            n += 1;
        }
        self.detector.set_emitting(true);
        self.rebuilt.extend(fresh.iter().copied());
        info!(events = n, partitions = ?fresh, ms = started.elapsed().as_millis() as u64, "detector state rebuilt from stored events");
        Ok(())
    }
}

/// The event-time windows detector state is rebuilt from, one per
/// events-topic partition with stored events: the last `span` before the
/// partition's newest stored event. The window ends there, not at the wall
/// clock: after an outage or a lag longer than the window, consumption
/// resumes at that event time, and an attack straddling the gap is only
/// seen whole if the events just before it are replayed. (Offsets stored
/// before migrations/0010 carry no event time: those windows end now.)
pub(crate) struct RebuildWindows {
    partitions: Vec<i32>,
    since: Vec<DateTime<Utc>>,
    until: Vec<DateTime<Utc>>,
}

impl RebuildWindows {
    /// The windows of `partitions` (None: every partition with stored
    /// offsets) of the consumer group and events topic `(group, topic)`.
    pub(crate) async fn read(
        client: &tokio_postgres::Client,
        (group, topic): (&str, &str),
        partitions: Option<&[i32]>,
        span: Duration,
        longest: Duration,
    ) -> Result<RebuildWindows, tokio_postgres::Error> {
        let ends: Vec<(i32, Option<DateTime<Utc>>)> = client
            .query(queries::REBUILD_WINDOW_ENDS, &[&group, &topic, &partitions])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(Self::from_ends(&ends, Utc::now(), span, longest))
    }

    /// Each partition's window is the `span` before its newest stored event
    /// (`now` when unknown); all of them lie within `longest` before the
    /// newest of all, so that a partition idle for weeks does not make the
    /// rebuild read weeks of events.
    fn from_ends(
        ends: &[(i32, Option<DateTime<Utc>>)],
        now: DateTime<Utc>,
        span: Duration,
        longest: Duration,
    ) -> RebuildWindows {
        let span = chrono::Duration::from_std(span).unwrap_or_default();
        let longest = chrono::Duration::from_std(longest).unwrap_or_default();
        let newest = ends.iter().map(|(_, end)| end.unwrap_or(now)).max().unwrap_or(now);
        let mut windows = RebuildWindows { partitions: Vec::new(), since: Vec::new(), until: Vec::new() };
        for (partition, end) in ends {
            let until = end.unwrap_or(now);
            let since = (until - span).max(newest - longest);
            if since <= until {
                windows.partitions.push(*partition);
                windows.since.push(since);
                windows.until.push(until);
            }
        }
        windows
    }

    /// The stored events in these windows whose action is one of `exact` or
    /// starts with one of `prefixes`, in `order`, with the columns of
    /// [`queries::REBUILD_EVENTS`].
    pub(crate) async fn events(
        &self,
        client: &tokio_postgres::Client,
        exact: &[String],
        prefixes: &[String],
        order: ReplayOrder,
    ) -> Result<tokio_postgres::RowStream, tokio_postgres::Error> {
        let (lateness, stream_order) = match order {
            ReplayOrder::EventTime { lateness } => (Some(format!("{} microseconds", lateness.as_micros())), false),
            ReplayOrder::Streams => (None, true),
        };
        // Nothing to read: the bounds then select no day.
        let lo = self.since.iter().min().copied().unwrap_or_else(Utc::now);
        let hi = self.until.iter().max().copied().unwrap_or(lo - chrono::Duration::seconds(1));
        client
            .query_raw(
                queries::REBUILD_EVENTS,
                [
                    &self.partitions as &(dyn tokio_postgres::types::ToSql + Sync),
                    &self.since,
                    &self.until,
                    &lo,
                    &hi,
                    &exact,
                    &prefixes,
                    &lateness,
                    &stream_order,
                ],
            )
            .await
    }
}

/// The order in which [`RebuildWindows::events`] replays stored events.
pub(crate) enum ReplayOrder {
    /// By event time, without the events that a detector fed each events
    /// partition in offset order dropped as later than `lateness` (the
    /// per-partition detectors: one stream per events partition).
    EventTime { lateness: Duration },
    /// Each events partition in offset order, the partitions interleaved by
    /// event time as far as each has come. For a detector whose streams
    /// are parts of an events partition (the routed detectors: one stream
    /// per routing partition and events partition), which judges lateness
    /// itself in each stream, as it did live.
    Streams,
}

/// An open alert read back by [`queries::OPEN_ALERTS`] (or a query with its
/// columns); None for a state this version does not know.
pub(crate) fn open_episode(r: &tokio_postgres::Row) -> Option<OpenEpisode> {
    Some(OpenEpisode {
        alert_id: r.get::<_, Uuid>(0),
        rule: r.get(1),
        key_spec: r.get(2),
        key_hash: r.get::<_, i64>(3) as u64,
        subject: r.get(4),
        state: AlertState::parse(r.get(5))?,
        severity: Severity::parse(r.get(6)),
        episode_start: r.get::<_, chrono::DateTime<chrono::Utc>>(7).timestamp_micros(),
        last_event_at: r.get::<_, chrono::DateTime<chrono::Utc>>(8).timestamp_micros(),
        partition: r.get(9),
    })
}

/// A transition read back by [`queries::UNDELIVERED_ALERTS`] (or
/// [`queries::UNDELIVERED_ROUTED_ALERTS`]); None for a state or action this
/// version does not know.
pub(crate) fn stored_transition(r: &tokio_postgres::Row) -> Option<Transition> {
    let micros = |t: chrono::DateTime<chrono::Utc>| t.timestamp_micros();
    Some(Transition {
        alert_id: r.get(0),
        rule: r.get(1),
        key_spec: r.get(2),
        key_hash: r.get::<_, i64>(3) as u64,
        subject: r.get(4),
        state: AlertState::parse(r.get(5))?,
        severity: Severity::parse(r.get(6)),
        count: u32::try_from(r.get::<_, i64>(7)).unwrap_or(u32::MAX),
        threshold: u32::try_from(r.get::<_, i64>(8)).unwrap_or(u32::MAX),
        window_seconds: r.get::<_, i64>(9).max(0) as u64,
        episode_start: micros(r.get(10)),
        first_event_at: r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(11).map(micros),
        last_event_at: r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(12).map(micros),
        sample_event_ids: r.get(13),
        recommended_action: crate::detect::RecommendedAction::parse(r.get(14))?,
        detected_at: micros(r.get(15)),
        partition: r.get(16),
    })
}

/// An event read back by [`queries::REBUILD_EVENTS`] (or a query with its
/// columns).
pub(crate) fn row_to_event(row: &tokio_postgres::Row) -> AuthEvent {
    let metadata: Option<serde_json::Value> = row.get(9);
    AuthEvent {
        event_id: row.get(0),
        occurred_at: row.get::<_, chrono::DateTime<chrono::Utc>>(1).timestamp_micros(),
        action: row.get(2),
        user_id: row.get(3),
        username: row.get(4),
        ip_address: row.get(5),
        user_agent: row.get(6),
        session_id: row.get(7),
        request_id: row.get(8),
        metadata: metadata
            .and_then(|m| m.as_object().cloned())
            .map(|m| m.into_iter().map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned())).collect())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + h * 3600, 0).unwrap()
    }

    #[test]
    fn rebuild_windows_end_where_each_partition_stored_events_end() {
        let hour = Duration::from_secs(3600);
        let day = Duration::from_secs(24 * 3600);
        let now = at(100);
        // 0: stopped three hours ago (an outage); 1: current; 2: stored
        // before migrations/0010 (no event time); 3: idle for weeks.
        let w = RebuildWindows::from_ends(
            &[(0, Some(at(97))), (1, Some(at(100))), (2, None), (3, Some(at(-500)))],
            now,
            hour,
            day,
        );
        assert_eq!(w.partitions, [0, 1, 2], "the idle partition is beyond the longest rebuild");
        assert_eq!(w.since, [at(96), at(99), at(99)]);
        assert_eq!(w.until, [at(97), at(100), at(100)]);

        // A partition's window is cut where the longest rebuild starts.
        let w = RebuildWindows::from_ends(&[(0, Some(at(77))), (1, Some(at(100)))], now, 2 * hour, day);
        assert_eq!(w.since, [at(76), at(98)]);
        assert!(RebuildWindows::from_ends(&[], now, hour, day).partitions.is_empty());
    }
}
