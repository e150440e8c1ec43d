pub mod coldstart;
