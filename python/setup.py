"""Generates the gRPC stubs of ../proto into the built package (weft.v1)."""

import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc  # a build requirement (pyproject.toml)
        import grpc_tools

        here = pathlib.Path(__file__).resolve().parent
        proto = pathlib.Path(os.environ.get("WEFT_PROTO_DIR", here.parent / "proto"))
        files = sorted(str(p.relative_to(proto)) for p in (proto / "weft" / "v1").glob("*.proto"))
        if not files:
            raise SystemExit(f"no .proto files under {proto}/weft/v1 (set WEFT_PROTO_DIR)")
        out = pathlib.Path(self.build_lib)
        include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{proto}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on " + " ".join(files))
        (out / "weft" / "v1" / "__init__.py").write_text(
            '"""Messages and stubs generated from proto/weft/v1."""\n'
        )


def runtime_requirements():
    """The generated stubs refuse an older protobuf or grpcio than the ones
    that made them: ask for at least those."""
    try:
        import google.protobuf
        import grpc_tools

        grpc_version = getattr(grpc_tools, "__version__", None)
        if grpc_version is None:
            from importlib.metadata import version

            grpc_version = version("grpcio-tools")
        return [f"grpcio>={grpc_version}", f"protobuf>={google.protobuf.__version__}"]
    except ImportError:  # outside a build (no build requirements)
        return ["grpcio>=1.62", "protobuf>=5.26"]


setup(cmdclass={"build_py": BuildWithStubs}, install_requires=runtime_requirements())
