import './prepare.ts';
