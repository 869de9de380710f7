//! Assembling an IUK ("kit"): the staging tree Tails' `tails-create-iuk`
//! packs into the outer image. So far: `control.yml`.

pub mod yaml;
