"""The [TAG] lines on stdlib logging: same tags and streams as before, and an application can take the records."""

from __future__ import annotations

import logging

from synthseg_native import log


def test_tags_and_streams(capsys):
    logger = logging.getLogger("synthseg_native.batch.runner")
    logger.info("a")
    logger.log(log.RUN, "b")
    logger.log(log.SKIP, "c")
    logger.log(log.DONE, "d")
    logger.warning("e")
    logger.error("f\nwith a newline in a file name")
    out, err = capsys.readouterr()
    assert out == "[INFO] a\n[RUN ] b\n[SKIP] c\n[DONE] d\n"
    assert err == "[WARN] e\n[ERR] f\\nwith a newline in a file name\n"


def test_an_application_can_route_the_records_itself(caplog, capsys):
    try:
        log.use_logging_config()
        with caplog.at_level(logging.INFO, logger="synthseg_native"):
            logging.getLogger("synthseg_native.api").warning("routed")
        assert [r.getMessage() for r in caplog.records] == ["routed"]
        assert capsys.readouterr().err == ""  # not printed by our handler
    finally:
        log.install()
    logging.getLogger("synthseg_native.api").warning("printed again")
    assert capsys.readouterr().err == "[WARN] printed again\n"
