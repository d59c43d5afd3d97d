"""Packaging for the Celery policy manager."""

from setuptools import Extension, find_packages, setup

setup(
    name="celery-policy-manager",
    version="0.1.0",
    description="Run small, sandboxed policies that tune a live Celery cluster.",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    packages=find_packages(include=["sandboxhost", "sandboxhost.*",
                                    "manager", "manager.*"]),
    # The zygote's fork server loop and the hardening of each policy child,
    # in C so that neither writes Python objects after a fork.
    ext_modules=[Extension("sandboxhost._forkserver",
                           ["sandboxhost/_forkserver.c"])],
    python_requires=">=3.11",
    install_requires=[
        "celery[redis]>=5.7,<5.8",
        "kombu>=5.7,<5.8",
        "multiprocess>=0.70.19,<0.71",
        "msgpack>=1.2,<2",
        "psutil>=7.0,<8",
        "SQLAlchemy>=2.1,<2.2",
        # Builds the seccomp filter of policy children; optional at run time
        # (the host reports once what it could not apply).
        "pyseccomp>=0.1.2,<0.2",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "hypothesis>=6.100,<7",
            "aiosmtpd>=1.4,<2",
        ],
    },
    entry_points={
        "console_scripts": [
            "cmpolicy = manager.cli:cmpolicy_main",
            "cmevents = manager.events:cmevents_main",
            "cmrun = manager.supervisor:cmrun_main",
        ],
        "pytest11": [
            "cmpolicy = manager.pytest_plugin",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Celery",
    ],
)
