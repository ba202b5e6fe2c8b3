"""Start the web app: ``python -m app [--port 7860] [--host 127.0.0.1] [--data_path data/demo]``."""

from __future__ import annotations

import argparse

from app.ui import SIZES, build, theme


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--data_path", default="", help="dataset folder shown at start")
    parser.add_argument("--pretrained", default="imagenet",
                        help="weights preselected on the page: imagenet, none or a .pdparams path")
    parser.add_argument("--image_size", type=int, default=256, choices=SIZES,
                        help="image size preselected on the page (default 256)")
    parser.add_argument("--max_file_size", default="20mb",
                        help="largest accepted upload, e.g. 20mb (default 20mb)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    page = build(args.data_path, args.pretrained, args.image_size)
    page.launch(server_name=args.host, server_port=args.port, share=False,
                max_file_size=args.max_file_size, theme=theme(), ssr_mode=False, footer_links=[])


if __name__ == "__main__":
    main()
