//! Opening the two ends of a copy: what each operand is (NBD export, server
//! program, regular file, block device, stream, `null:`), its size, how many
//! connections it allows, and the first connection; later connections for
//! more workers come from [`Again`].

use std::fs::{File, OpenOptions};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use nbd_blocking::{Client, Error};
use nbd_proto::Config;

use super::local::{self, Kind, Local, Writeback};
use super::ordered::Ordered;
use super::side::{self, Side};
use super::worker::{Destination, Extents, Source};
use crate::extents::BASE_ALLOCATION;
use crate::operand::Operand;

/// An end of the copy, opened once.
pub struct Opened<E> {
    /// The first connection or handle, for the first worker.
    pub first: E,
    /// How many workers this end can serve: 1 for a stream, a server program
    /// or an export without multi-conn; unlimited for local files and `null:`.
    pub max_workers: usize,
    /// How to open more.
    pub again: Again,
}

/// How to open the same end once more, for another worker.
pub enum Again {
    Nbd(Operand, Config),
    LocalSource(Arc<Local>),
    LocalDestination(Arc<Local>),
    Null,
    /// Streams serve one worker only.
    Never,
}

impl<E> Opened<E> {
    fn new(first: E, max_workers: usize, again: Again) -> Opened<E> {
        Opened {
            first,
            max_workers,
            again,
        }
    }
}

/// What the source is, once opened.
pub struct SourceInfo {
    /// Size in bytes; `None` for a stream read to its end.
    pub size: Option<u64>,
    /// What its extents will steer.
    pub extents: Extents,
    /// Largest request it takes.
    pub max_request: usize,
    /// Whether it advertised multi-conn (`None`: not an NBD export).
    pub multi_conn: Option<bool>,
    /// The round trip to its server: zero for a local end, `None` where the
    /// kernel cannot tell.
    pub round_trip: Option<Duration>,
}

/// Opens the source. `changed` is `--changed`'s context; `use_extents` is
/// false under `--no-extents`.
pub fn source(
    operand: &Operand,
    changed: Option<&str>,
    use_extents: bool,
) -> Result<(Opened<Source>, SourceInfo), Error> {
    if let Some(path) = operand.local() {
        if changed.is_some() {
            return Err(side::named(
                Side::Source,
                format!("{path}: --changed needs an NBD source with a dirty bitmap"),
            ));
        }
        let info = |size| SourceInfo {
            size,
            extents: Extents::Ignore,
            max_request: usize::MAX,
            multi_conn: None,
            round_trip: Some(Duration::ZERO),
        };
        let kind = match path {
            "-" => Kind::Stream,
            _ => local::kind_of(path)
                .map_err(|e| side::named(Side::Source, format!("{path}: {e}")))?
                .unwrap_or(Kind::Regular),
        };
        if kind == Kind::Stream {
            let reader: Box<dyn io::Read + Send> = match path {
                "-" => Box::new(io::stdin()),
                _ => Box::new(
                    File::open(path)
                        .map_err(|e| side::named(Side::Source, format!("{path}: {e}")))?,
                ),
            };
            let opened = Opened::new(Source::Stream(reader), 1, Again::Never);
            return Ok((opened, info(None)));
        }
        let file = Arc::new(
            Local::open_source(path)
                .map_err(|e| side::named(Side::Source, format!("{path}: {e}")))?,
        );
        let size = file.size();
        let opened = Opened::new(
            Source::Local(file.clone()),
            usize::MAX,
            Again::LocalSource(file),
        );
        return Ok((opened, info(Some(size))));
    }
    let mut config = Config::default();
    match changed {
        Some(context) => {
            config.meta_contexts.push(context.into());
            // Where offered, dirty runs that read as zeroes need no reading.
            config.meta_contexts.push(BASE_ALLOCATION.into());
        }
        None if use_extents => config.meta_contexts.push(BASE_ALLOCATION.into()),
        None => {}
    }
    let client = connect(operand, &config, Side::Source)?;
    let size = client.size()?;
    let conn = client.connection();
    let extents = match changed {
        Some(context) if conn.can_meta_context(context) => Extents::Changed {
            context: context.into(),
            allocation: conn.can_meta_context(BASE_ALLOCATION),
        },
        Some(context) => {
            return Err(side::named(
                Side::Source,
                format!("{operand} does not offer the meta context {context:?}"),
            ))
        }
        None if use_extents && conn.can_meta_context(BASE_ALLOCATION) => Extents::Allocation,
        None => Extents::Ignore,
    };
    let multi_conn = conn.can_multi_conn()?;
    let info = SourceInfo {
        size: Some(size),
        extents,
        max_request: client.max_request(),
        multi_conn: Some(multi_conn),
        round_trip: client.socket().round_trip_time(),
    };
    let opened = nbd_opened(operand, config, multi_conn, Source::Nbd(Box::new(client)));
    Ok((opened, info))
}

fn nbd_opened<E>(operand: &Operand, config: Config, multi_conn: bool, first: E) -> Opened<E> {
    // Each connection to a server program would start a server of its own.
    let max = match operand {
        Operand::Word(_) if multi_conn => usize::MAX,
        _ => 1,
    };
    Opened::new(first, max, Again::Nbd(operand.clone(), config))
}

/// What the destination is, once opened.
pub struct DestinationInfo {
    /// It reads as zeroes already (a file just created or emptied).
    pub is_zero: bool,
    /// Its preferred block size (0 where it says none).
    pub preferred_block: u64,
    /// Largest request it takes.
    pub max_request: usize,
    /// Whether it advertised multi-conn (`None`: not an NBD export).
    pub multi_conn: Option<bool>,
    /// The round trip to its server: zero for a local end, `None` where the
    /// kernel cannot tell.
    pub round_trip: Option<Duration>,
}

/// Opens the destination for a source of `size` bytes (`None`: a stream of
/// unknown length). With `keep`, a local file keeps its content (an
/// incremental copy into an existing backup).
pub fn destination(
    operand: &Operand,
    size: Option<u64>,
    keep: bool,
) -> Result<(Opened<Destination>, DestinationInfo), Error> {
    if let Some(path) = operand.local() {
        let info = |is_zero| DestinationInfo {
            is_zero,
            preferred_block: 0,
            max_request: usize::MAX,
            multi_conn: None,
            round_trip: Some(Duration::ZERO),
        };
        let name = |e: io::Error| side::named(Side::Destination, format!("{path}: {e}"));
        if path == "null:" {
            return Ok((
                Opened::new(Destination::Null, usize::MAX, Again::Null),
                info(true),
            ));
        }
        let kind = match path {
            "-" => Kind::Stream,
            _ => local::kind_of(path).map_err(name)?.unwrap_or(Kind::Regular),
        };
        if kind == Kind::Stream {
            let out: Box<dyn io::Write + Send> = match path {
                "-" => Box::new(io::stdout()),
                _ => Box::new(OpenOptions::new().write(true).open(path).map_err(name)?),
            };
            let dest = Destination::Stream(Ordered::new(out));
            return Ok((Opened::new(dest, 1, Again::Never), info(false)));
        }
        if keep && local::kind_of(path).map_err(name)?.is_none() {
            return Err(name(io::Error::new(
                io::ErrorKind::NotFound,
                "an incremental copy (--changed) needs the existing destination",
            )));
        }
        let file = Arc::new(Local::open_destination(path, size.unwrap_or(0), keep).map_err(name)?);
        let is_zero = !keep && !file.is_block_device();
        let dest = Destination::Local(file.clone(), Writeback::default());
        let opened = Opened::new(dest, usize::MAX, Again::LocalDestination(file));
        return Ok((opened, info(is_zero)));
    }
    let config = Config::default();
    let client = connect(operand, &config, Side::Destination)?;
    let conn = client.connection();
    if conn.is_read_only()? {
        return Err(side::named(
            Side::Destination,
            format!("{operand} is read-only"),
        ));
    }
    let dst_size = client.size()?;
    if let Some(size) = size.filter(|&size| size > dst_size) {
        return Err(side::named(
            Side::Destination,
            format!("{operand}: its size {dst_size} is smaller than the source size {size}"),
        ));
    }
    let can_zero = conn.can_zero()?;
    let multi_conn = conn.can_multi_conn()?;
    let info = DestinationInfo {
        is_zero: false,
        preferred_block: conn.block_sizes().map_or(0, |b| u64::from(b.preferred)),
        max_request: client.max_request(),
        multi_conn: Some(multi_conn),
        round_trip: client.socket().round_trip_time(),
    };
    let dest = Destination::Nbd {
        client: Box::new(client),
        can_zero,
    };
    Ok((nbd_opened(operand, config, multi_conn, dest), info))
}

impl Again {
    /// Another source end for one more worker.
    pub fn source(&self) -> Result<Source, Error> {
        match self {
            Again::Nbd(operand, config) => Ok(Source::Nbd(Box::new(connect(
                operand,
                config,
                Side::Source,
            )?))),
            Again::LocalSource(file) => Ok(Source::Local(file.clone())),
            _ => Err(side::named(Side::Source, "serves one worker only")),
        }
    }

    /// Another destination end for one more worker.
    pub fn destination(&self) -> Result<Destination, Error> {
        match self {
            Again::Nbd(operand, config) => {
                let client = connect(operand, config, Side::Destination)?;
                let can_zero = client.connection().can_zero()?;
                Ok(Destination::Nbd {
                    client: Box::new(client),
                    can_zero,
                })
            }
            Again::LocalDestination(file) => {
                Ok(Destination::Local(file.clone(), Writeback::default()))
            }
            Again::Null => Ok(Destination::Null),
            _ => Err(side::named(Side::Destination, "serves one worker only")),
        }
    }
}

/// One connection to `operand`, with `--retries` in force; errors name `side`.
fn connect(operand: &Operand, config: &Config, side: Side) -> Result<Client, Error> {
    let mut client = operand
        .connect(config.clone())
        .map_err(|e| side::named(side, e))?;
    crate::retries::enable(&mut client).map_err(|e| side::named(side, e))?;
    Ok(client)
}
