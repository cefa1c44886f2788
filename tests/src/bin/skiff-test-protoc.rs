//! A `protoc` for the build scripts of the third-party crates the tests
//! build, so that those build with nothing but a Rust toolchain, as Skiff
//! does.
//!
//! The etcd-client crate (a Rust etcd client library, driven against Skiff
//! by `tests/etcd_client.rs`) compiles etcd's `.proto` files in its build
//! script through `prost-build`, which runs the program named by `PROTOC`.
//! `prost-build` only asks protoc for a file descriptor set:
//!
//! ```text
//! PROTOC --include_imports [--include_source_info] -o OUT [-I DIR]... FILE...
//! ```
//!
//! This program answers exactly that, by parsing the files with `protox`
//! (the pure-Rust parser Skiff's own build uses). Anything else protoc does
//! (code generators, `--foo_out`) is refused with a clear error rather than
//! silently ignored.

use std::path::PathBuf;
use std::process::ExitCode;

/// What one run was asked to do.
#[derive(Debug, Default)]
struct Request {
    includes: Vec<PathBuf>,
    files: Vec<PathBuf>,
    out: Option<PathBuf>,
    include_imports: bool,
    include_source_info: bool,
}

fn parse(args: impl IntoIterator<Item = String>) -> Result<Request, String> {
    let mut req = Request::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match arg.as_str() {
            "--include_imports" => req.include_imports = true,
            "--include_source_info" => req.include_source_info = true,
            // protox accepts proto3 `optional` without being asked.
            "--experimental_allow_proto3_optional" => {}
            "-o" | "--descriptor_set_out" => req.out = Some(value(&arg)?),
            "-I" | "--proto_path" => req.includes.push(value(&arg)?),
            _ => {
                if let Some(v) = arg.strip_prefix("--descriptor_set_out=") {
                    req.out = Some(v.into());
                } else if let Some(v) = arg.strip_prefix("--proto_path=") {
                    req.includes.push(v.into());
                } else if let Some(v) = arg.strip_prefix("-o").filter(|v| !v.is_empty()) {
                    req.out = Some(v.into());
                } else if let Some(v) = arg.strip_prefix("-I").filter(|v| !v.is_empty()) {
                    req.includes.push(v.into());
                } else if arg.starts_with('-') {
                    return Err(format!(
                        "unsupported option {arg:?}: this protoc only writes descriptor sets"
                    ));
                } else {
                    req.files.push(arg.into());
                }
            }
        }
    }
    if req.files.is_empty() {
        return Err("no .proto files given".into());
    }
    if req.out.is_none() {
        return Err("no output given (-o FILE): this protoc only writes descriptor sets".into());
    }
    if req.includes.is_empty() {
        req.includes.push(".".into());
    }
    Ok(req)
}

fn run(req: Request) -> Result<(), String> {
    let mut compiler = protox::Compiler::new(&req.includes).map_err(|e| format!("{e:?}"))?;
    compiler.include_imports(req.include_imports);
    compiler.include_source_info(req.include_source_info);
    compiler
        .open_files(&req.files)
        .map_err(|e| format!("{e:?}"))?;
    let out = req.out.expect("checked by parse");
    std::fs::write(&out, compiler.encode_file_descriptor_set())
        .map_err(|e| format!("cannot write {}: {e}", out.display()))
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skiff-test-protoc: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn takes_what_prost_build_passes() {
        let req = parse(args(&[
            "--include_imports",
            "--include_source_info",
            "-o",
            "/tmp/out",
            "-I",
            "proto",
            "--proto_path=more",
            "proto/a.proto",
            "proto/b.proto",
        ]))
        .unwrap();
        assert!(req.include_imports && req.include_source_info);
        assert_eq!(req.out, Some("/tmp/out".into()));
        assert_eq!(req.includes, [PathBuf::from("proto"), "more".into()]);
        assert_eq!(
            req.files,
            [PathBuf::from("proto/a.proto"), "proto/b.proto".into()]
        );
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let err = parse(args(&["--rust_out=x", "-o", "out", "a.proto"])).unwrap_err();
        assert!(err.contains("--rust_out=x"), "{err}");
        let err = parse(args(&["a.proto"])).unwrap_err();
        assert!(err.contains("-o FILE"), "{err}");
        let err = parse(args(&["-o", "out"])).unwrap_err();
        assert!(err.contains("no .proto files"), "{err}");
        assert!(parse(args(&["-o"])).unwrap_err().contains("needs a value"));
    }

    #[test]
    fn writes_a_descriptor_set_that_decodes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.proto"),
            "syntax = \"proto3\";\npackage t;\nmessage M { optional int64 x = 1; }\n",
        )
        .unwrap();
        let out = dir.path().join("set");
        run(parse(args(&[
            "--include_imports",
            "-o",
            out.to_str().unwrap(),
            "-I",
            dir.path().to_str().unwrap(),
            dir.path().join("a.proto").to_str().unwrap(),
        ]))
        .unwrap())
        .unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert!(
            bytes.windows(b"a.proto".len()).any(|w| w == b"a.proto"),
            "the set names the file"
        );
        let err =
            run(parse(args(&["-o", out.to_str().unwrap(), "missing.proto"])).unwrap()).unwrap_err();
        assert!(err.contains("missing.proto"), "{err}");
    }
}
